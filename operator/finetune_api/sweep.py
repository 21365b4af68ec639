"""FinetuneSweep: a hyperparameter search whose trials are FinetuneJobs.

`spec.template` is a FinetuneJob spec; each parameter names a field of it by its camelCase path
(`training.learningRate`) and a search space. The operator samples a value for every parameter,
applies them to the template and creates the trial as a child FinetuneJob, which runs the whole
pipeline (training, GGUF export, parity, S3 upload). The objective is read from the trial's status.

What the apiserver can check is emitted as schema and CEL (`x-kubernetes-validations`): the path
is one of the tunable fields, ranges are ordered, logUniform starts above 0, a range stays inside
the field's own bounds, integer fields take int or choice, grid needs discrete spaces. What needs
the template (each choice value and each range end applied to it must still be a valid
FinetuneJob spec) is checked in Python by the same model, so the operator reports it with the
field named.
"""

from __future__ import annotations

import copy
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types
from pydantic import Field, ValidationError, model_validator

from .base import ApiModel, Rule
from .spec import FinetuneJobSpec
from .status import Condition

# Sections of a FinetuneJob spec whose scalar fields may be tuned. Output, resources and run policy
# say where and how a trial runs, not what it learns, so they stay the template's.
TUNABLE_SECTIONS = ("baseModel", "dataset", "training", "export")
MAX_SWEEP_NAME = 47  # trial FinetuneJobs are "<sweep>-t<k>" (k < 1000) within FinetuneJob's 52
MAX_TRIALS = 1000


@dataclass(frozen=True)
class Tunable:
    """One scalar field of FinetuneJobSpec that a parameter may set."""

    path: str  # camelCase, dot-separated, relative to spec
    kind: Literal["int", "float", "bool", "str"]
    lower: float | None = None  # inclusive unless lower_open
    lower_open: bool = False
    upper: float | None = None
    upper_open: bool = False


def _value_branch(ann: Any) -> tuple[Any, list[Any]]:
    """An `X | Literal["auto"]` field (batchSize) is tuned by its value branch: (X, X's constraints)."""
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        values = [a for a in args if typing.get_origin(a) is not Literal]
        if len(args) > 1 and len(values) == 1:
            ann = values[0]
    if typing.get_origin(ann) is typing.Annotated:
        base, *extra = typing.get_args(ann)
        return base, [m for e in extra for m in getattr(e, "metadata", [e])]
    return ann, []


def _scalar_kind(ann: Any) -> str | None:
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return _scalar_kind(args[0]) if len(args) == 1 else None
    if typing.get_origin(ann) is Literal:
        return "str" if all(isinstance(a, str) for a in args) else None
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(ann)


def _tunables(model: type[ApiModel], prefix: str) -> list[Tunable]:
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        ann = field.annotation
        nested = next((a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, ApiModel)),
                      None)
        if nested is not None:
            if not path.endswith("Ref"):  # Secret and ConfigMap references are wiring, not hyperparameters
                out += _tunables(nested, path + ".")
            continue
        ann, branch_meta = _value_branch(ann)
        kind = _scalar_kind(ann)
        if kind is None:
            continue  # lists, maps, free objects: not a single value to search over
        bounds: dict[str, Any] = {}
        for meta in [*field.metadata, *branch_meta]:
            if isinstance(meta, annotated_types.Ge):
                bounds.update(lower=float(meta.ge))
            elif isinstance(meta, annotated_types.Gt):
                bounds.update(lower=float(meta.gt), lower_open=True)
            elif isinstance(meta, annotated_types.Le):
                bounds.update(upper=float(meta.le))
            elif isinstance(meta, annotated_types.Lt):
                bounds.update(upper=float(meta.lt), upper_open=True)
        out.append(Tunable(path, kind, **bounds))
    return out


def tunable_fields() -> dict[str, Tunable]:
    """Every tunable path of FinetuneJobSpec, derived from the model (new fields join automatically)."""
    out = {}
    for name, field in FinetuneJobSpec.model_fields.items():
        section = field.alias or name
        if section in TUNABLE_SECTIONS:
            ann = field.annotation
            model = next(a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, ApiModel))
            out.update((t.path, t) for t in _tunables(model, section + "."))
    return out


TUNABLE = tunable_fields()
TunablePath = Literal[tuple(TUNABLE)]  # type: ignore[valid-type]  # the CRD's enum, and pydantic's check


def _cel_number(x: float) -> str:
    return repr(float(x))


def _bound_rule(t: Tunable) -> Rule | None:
    """CEL keeping every range end of a parameter on `t` within the field's own bounds."""
    if t.kind not in ("int", "float") or (t.lower is None and t.upper is None):
        return None

    def within(expr: str) -> str:
        terms = []
        if t.lower is not None:
            terms.append(f"{expr} {'>' if t.lower_open else '>='} {_cel_number(t.lower)}")
        if t.upper is not None:
            terms.append(f"{expr} {'<' if t.upper_open else '<='} {_cel_number(t.upper)}")
        return " && ".join(terms)

    spaces = [f"(!has(self.{s}) || ({within(f'self.{s}.min')} && {within(f'self.{s}.max')}))"
              for s in ("uniform", "logUniform")]
    spaces.append(f"(!has(self.int) || ({within('double(self.int.min)')} && {within('double(self.int.max)')}))")
    low = "" if t.lower is None else f"{'>' if t.lower_open else '>='} {t.lower:g}"
    high = "" if t.upper is None else f"{'<' if t.upper_open else '<='} {t.upper:g}"
    message = f"{t.path} must be {' and '.join(b for b in (low, high) if b)}: the search range leaves it"

    def check(p: Parameter) -> bool:
        if p.path != t.path:
            return True
        return all(_within(t, v) for v in p.range_ends())

    return Rule(f"self.path != '{t.path}' || ({' && '.join(spaces)})", message, check)


def _within(t: Tunable, v: float) -> bool:
    if t.lower is not None and (v <= t.lower if t.lower_open else v < t.lower):
        return False
    return not (t.upper is not None and (v >= t.upper if t.upper_open else v > t.upper))


class ChoiceSpace(ApiModel):
    values: list[Any] = Field(min_length=1, max_length=64, description=(
        "The values to choose from: numbers, strings or booleans, each valid for the field."))

    @model_validator(mode="after")
    def _scalars(self):
        for i, v in enumerate(self.values):
            if not isinstance(v, str | int | float | bool):
                raise ValueError(f"choice.values[{i}]: must be a number, string or boolean")
        return self


class UniformSpace(ApiModel):
    rules = (Rule("self.min < self.max", "uniform: min must be less than max", lambda s: s.min < s.max),)
    min: float = Field(description="Lower end (inclusive).")
    max: float = Field(description="Upper end.")


class LogUniformSpace(ApiModel):
    rules = (Rule("self.min < self.max", "logUniform: min must be less than max", lambda s: s.min < s.max),)
    min: float = Field(gt=0, description="Lower end (inclusive); > 0, values are sampled uniformly in log space.")
    max: float = Field(gt=0, description="Upper end.")


class IntSpace(ApiModel):
    rules = (Rule("self.min < self.max", "int: min must be less than max", lambda s: s.min < s.max),)
    min: int = Field(description="Lower end (inclusive).")
    max: int = Field(description="Upper end (inclusive when reachable in steps from min).")
    step: int = Field(1, ge=1, le=1_000_000, description="Spacing of the values from min.")


_INT_PATHS = [p for p, t in TUNABLE.items() if t.kind == "int"]
_SPACES = ("choice", "uniform", "logUniform", "int")


class Parameter(ApiModel):
    """One field of the template to search over, and its space. Set exactly one space."""

    rules = (
        Rule(" + ".join(f"(has(self.{s}) ? 1 : 0)" for s in _SPACES) + " == 1",
             "parameters: set exactly one of choice, uniform, logUniform and int",
             lambda p: sum(x is not None for x in (p.choice, p.uniform, p.log_uniform, p.int_range)) == 1),
        Rule(f"!(self.path in {_INT_PATHS!r}) || (!has(self.uniform) && !has(self.logUniform))",
             "parameters: an integer field takes an int or choice space, not uniform or logUniform",
             lambda p: TUNABLE[p.path].kind != "int" or (p.uniform is None and p.log_uniform is None)),
        Rule("!has(self.uniform) && !has(self.logUniform) && !has(self.int) || "
             f"self.path in {[p for p, t in TUNABLE.items() if t.kind in ('int', 'float')]!r}",
             "parameters: uniform, logUniform and int need a numeric field; use choice",
             lambda p: TUNABLE[p.path].kind in ("int", "float") or p.choice is not None),
        *(r for r in map(_bound_rule, TUNABLE.values()) if r is not None),
    )
    path: TunablePath = Field(max_length=128, description=(  # type: ignore[valid-type]
        "Field of the template to set, camelCase and dot-separated as in the FinetuneJob spec, e.g. "
        "training.learningRate, training.lora.r, training.epochs. Scalar fields of baseModel, dataset, "
        "training and export may be tuned."))
    choice: ChoiceSpace | None = Field(None, description="Pick one of a list of values.")
    uniform: UniformSpace | None = Field(None, description="A float, uniformly between min and max.")
    log_uniform: LogUniformSpace | None = Field(None, description="A float, log-uniformly between min and max "
                                                "(learning rates).")
    int_range: IntSpace | None = Field(None, alias="int", description="An integer from min to max in steps.")

    def range_ends(self) -> list[float]:
        space = self.uniform or self.log_uniform or self.int_range
        return [space.min, space.max] if space else []

    def candidates(self) -> list[Any]:
        """Values that must each give a valid spec: every choice, or both ends of a range."""
        return list(self.choice.values) if self.choice else self.range_ends()

    def grid(self) -> list[Any]:
        if self.choice:
            return list(self.choice.values)
        if self.int_range:
            return list(range(self.int_range.min, self.int_range.max + 1, self.int_range.step))
        raise ValueError(f"{self.path}: a grid needs a choice or int space")


class Objective(ApiModel):
    metric: str = Field(
        pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$", max_length=256, description=(
            "Path of a number in the trial FinetuneJob's status, e.g. metrics.evalLoss (needs "
            "dataset.validationSplit > 0), metrics.trainLoss, or metrics.eval.<task>.<metric> from evaluation."))
    goal: Literal["minimize", "maximize"] = Field("minimize", description="Whether lower or higher is better.")


LossMetric = Literal["evalLoss", "trainLoss"]


class EarlyStopping(ApiModel):
    """Median stopping rule: a running trial whose latest loss is worse than the median of the
    completed trials' losses at the same step is stopped (suspended and recorded as Pruned)."""

    rule: Literal["median"] = Field("median", description="The stopping rule; median is the only one.")
    metric: LossMetric = Field("evalLoss", description=(
        "The loss the rule compares. evalLoss: the validation loss the trials report every "
        "template.training.evalEverySteps steps (status.progress.evalLoss; needs that field and "
        "dataset.validationSplit > 0), compared at the same eval step. trainLoss: the training loss "
        "(status.progress.loss), smoothed over the trainer's report interval and noisier, at the latest "
        "reported step."))
    min_trials: int = Field(2, ge=1, le=100, description="Finished trials needed before any trial is stopped.")
    min_steps: int = Field(1, ge=0, le=10_000_000, description="Never stop a trial before this many steps.")


class FinetuneSweepSpec(ApiModel):
    """A hyperparameter search: trials are FinetuneJobs made from the template."""

    rules = (
        Rule("!has(self.algorithm) || self.algorithm != 'grid' || "
             "self.parameters.all(p, has(p.choice) || has(p.int))",
             "algorithm grid needs every parameter to be a choice or int space",
             lambda s: s.algorithm != "grid" or all(p.choice or p.int_range for p in s.parameters)),
        Rule("!has(self.earlyStopping) || (has(self.earlyStopping.metric) && self.earlyStopping.metric == "
             "'trainLoss') || (has(self.template.training) && has(self.template.training.evalEverySteps)) || "
             "self.parameters.exists(p, p.path == 'training.evalEverySteps')",
             "spec.earlyStopping.metric evalLoss (the default) needs template.training.evalEverySteps: the "
             "trials report a validation loss only then; set it, or earlyStopping.metric: trainLoss",
             lambda s: s.early_stopping is None or s.early_stopping.metric == "trainLoss"
             or s.template.training.eval_every_steps is not None
             or any(p.path == "training.evalEverySteps" for p in s.parameters),
             field_path=".earlyStopping"),
    )
    template: FinetuneJobSpec = Field(description="The FinetuneJob spec every trial starts from.")
    parameters: list[Parameter] = Field(
        min_length=1, max_length=16, description="The search space: one entry per tuned field (a path at most once).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["path"]})
    objective: Objective = Field(description="What each trial is scored on.")
    algorithm: Literal["grid", "random", "tpe"] = Field("random", description=(
        "grid: every combination in order (choice and int spaces only). random: independent samples. "
        "tpe: Optuna's Tree-structured Parzen Estimator, informed by the finished trials."))
    max_trials: int = Field(10, ge=1, le=MAX_TRIALS - 1, description=(
        "Trials to run at most (a grid stops at its size). Failed trials count and are not retried."))
    parallelism: int = Field(1, ge=1, le=100, description="Trials running at the same time.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description=(
        "Sampler seed; trial k draws with a seed derived from it and k, so runs are reproducible."))
    early_stopping: EarlyStopping | None = Field(None, description="Stop unpromising trials early; unset runs all.")
    suspend: bool = Field(False, description=(
        "Suspend the sweep: no new trials, and running trials get runPolicy.suspend until set back."))

    @model_validator(mode="after")
    def _values_fit_the_template(self):
        seen = set()
        for i, param in enumerate(self.parameters):
            if param.path in seen:
                raise ValueError(f"parameters[{i}].path: {param.path} is tuned twice")
            seen.add(param.path)
            for value in param.candidates():
                error = trial_spec_error(self.template, {param.path: value})
                if error:
                    raise ValueError(f"parameters[{i}] ({param.path}={value!r}): {error}")
        return self

    def grid_size(self) -> int:
        return math.prod(len(p.grid()) for p in self.parameters)


def apply_parameters(template: FinetuneJobSpec | dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The template as stored (camelCase, unset fields absent) with each path set to its value."""
    if isinstance(template, ApiModel):  # what the user wrote, not every default spelled out
        template = template.model_dump(by_alias=True, exclude_unset=True, exclude_none=True, mode="json")
    spec = copy.deepcopy(template)
    for path, value in params.items():
        node = spec
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return spec


def trial_spec_error(template: FinetuneJobSpec, params: dict[str, Any]) -> str | None:
    """Why the template with `params` applied is not a valid FinetuneJob spec, or None."""
    try:
        FinetuneJobSpec.model_validate(apply_parameters(template, params))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        return f"template.{loc}: {msg}" if loc else msg
    return None


# ----------------------------------------------------------------------------- status


class SweepPhase:
    PENDING = "Pending"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class TrialState:
    """A trial as the search sees it (its FinetuneJob's phase tells the rest)."""

    RUNNING = "Running"
    COMPLETE = "Complete"  # succeeded and reported the objective
    FAILED = "Failed"  # failed, or succeeded without the objective metric
    PRUNED = "Pruned"  # stopped by the early-stopping rule


class TrialStatus(ApiModel):
    number: int = Field(description="Trial number k (0-based); the trial FinetuneJob is <sweep>-t<k>.")
    name: str = Field(description="The trial's FinetuneJob.")
    parameters: dict[str, Any] = Field(description="The values this trial was given, by path.")
    phase: str | None = Field(None, description="The FinetuneJob's phase.")
    state: str = Field(description="Running, Complete, Failed or Pruned.")
    objective: float | None = Field(None, description="The objective metric, once the trial succeeded.")
    message: str | None = Field(None, description="Why it failed or was pruned.", max_length=1024)
    losses: dict[str, float] | None = Field(None, description=(
        "Loss by step, as seen while it ran (the early-stopping rule compares these); lossMetric says which."))
    loss_metric: LossMetric | None = Field(None, description=(
        "Which loss `losses` holds: evalLoss (validation loss at the eval steps) or trainLoss; the "
        "sweep's earlyStopping.metric, trainLoss without earlyStopping."))


class BestTrial(ApiModel):
    number: int = Field(description="Trial number.")
    name: str = Field(description="The trial's FinetuneJob.")
    value: float = Field(description="Its objective value.")
    parameters: dict[str, Any] = Field(description="Its parameters.")
    output_uri: str | None = Field(None, description="S3 prefix of its artifacts.")
    artifacts: list[str] | None = Field(None, description="S3 URIs of its GGUF files, adapter and manifest.")


class FinetuneSweepStatus(ApiModel):
    phase: str | None = Field(None, description="Pending, Running, Suspended, Succeeded or Failed.")
    conditions: list[Condition] = Field(default_factory=list, description="Latest observations (metav1.Condition).")
    observed_generation: int | None = Field(None, description="Spec generation last acted on.")
    trial_progress: str | None = Field(None, description="Finished trials out of the most that will run, e.g. 3/4.")
    trials: list[TrialStatus] | None = Field(None, description="Every trial created so far, by number.")
    best_trial: BestTrial | None = Field(None, description="The trial with the best objective so far.")
    reason: str | None = Field(None, description="Reason for the current phase (CamelCase).")
    message: str | None = Field(None, description="Detail for the current phase.")
