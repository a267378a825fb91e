"""`as_is`: the core's one defense, which applies nothing. It evaluates the run's model as the user gives it:
the checkpoint of `--checkpoint` loaded into `--model` (`ctx.base(recipe)`), or, without a checkpoint, the
model the factory returns (a factory may load its own weights). `bench run --model ...` without
`--defense` runs it.
"""

from __future__ import annotations

from bench import models
from bench.checkpoints import RECIPES
from bench.contract import Defended, Defense
from bench.errors import BenchError
from bench.params import Param


class AsIs(Defense):
    """The model as given (--model, --checkpoint): no defense applied."""

    PARAMS = {"recipe": Param("auto", "which --checkpoint RECIPE=PATH to evaluate (auto: the only one given)",
                              choices=("auto",) + RECIPES)}

    @staticmethod
    def checkpoint_recipe(model: str, checkpoints, recipe: str) -> str | None:
        """The recipe whose checkpoint is evaluated, None for the factory's own model; a request that
        cannot be served (several checkpoints and no choice, a built-in's random weights) is an error,
        raised before anything runs."""
        given = sorted(checkpoints)
        if recipe != "auto":
            if recipe not in given:
                raise BenchError(f"as_is: recipe={recipe} names no --checkpoint; given: "
                                 f"{', '.join(given) if given else 'none'}")
            return recipe
        if len(given) > 1:
            raise BenchError(f"as_is: {len(given)} checkpoints given ({', '.join(given)}); choose the one to "
                             f"evaluate with --param recipe=NAME")
        if given:
            return given[0]
        if models.is_builtin(model):
            raise BenchError(f"as_is: model '{model}' is a built-in architecture, so without --checkpoint its "
                             f"weights are random; give --checkpoint PATH, or a --defense that trains it")
        return None

    def build(self, ctx) -> Defended:
        recipe = self.checkpoint_recipe(ctx.arch, ctx.base_checkpoints, self.params.recipe)
        if recipe is None and not models.is_instance(ctx.arch):  # (an object from bench.evaluate has its weights)
            ctx.log.warning("as_is: no --checkpoint given: model '%s' is evaluated as its factory builds it "
                            "(with the weights the factory itself loads, if any)", ctx.arch)
        if recipe is None:
            model = ctx.build_model()
        else:
            model = ctx.base(recipe)
        return Defended(model=model.eval(), info={
            "model": ctx.arch, "checkpoint": str(ctx.base_checkpoints[recipe]) if recipe else None})
