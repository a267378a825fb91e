"""The base training recipes as defenses: each returns its cached base model as the defended model."""

from __future__ import annotations

from bench.api import Context, Defended, Defense


class _BaseRecipe(Defense):
    recipe = ""

    def build(self, ctx: Context) -> Defended:
        model = ctx.base(self.recipe)
        return Defended(model=model.eval(), info={"recipe": self.recipe})


class Standard(_BaseRecipe):
    """Clean training (cross-entropy, SGD, crop+flip): the undefended reference."""

    recipe = "standard"


class PGDAT(_BaseRecipe):
    """Madry PGD adversarial training (PGD-10, BN eval while crafting), best robust validation epoch."""

    recipe = "pgd_at"


class TRADES(_BaseRecipe):
    """TRADES (beta = 6): CE on clean plus KL to the KL-maximising PGD example."""

    recipe = "trades"


class FGSMRS(_BaseRecipe):
    """Fast adversarial training (Wong et al. 2020): FGSM from a random start, cyclic learning rate."""

    recipe = "fgsm_rs"
