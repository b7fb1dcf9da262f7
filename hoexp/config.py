"""Typed structured configs: one dataclass per option of every config group.

The YAML files under ``conf/`` choose and tune options; :func:`validate` merges each group's node
into the dataclass its ``name`` selects, so unknown keys, wrong types and out-of-range values end
in a one-line :class:`~hoexp.errors.ConfigError` before anything runs. Only this module and
``cli.py`` know about OmegaConf.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from hoexp.errors import ConfigError


# ---------------------------------------------------------------------------------------- dataset
@dataclass
class IrisConfig:
    name: str = "iris"
    train_size: int = 60
    val_size: int = 60
    test_size: int = 30
    split_seed: int | None = None  # None: the run's seed (each seed its own split)
    standardize: bool = True
    batch_size: int = 0  # inner-step minibatch; 0 = full batch (the reference experiment)
    val_batch_size: int = 0  # hypergradient validation minibatch; 0 = the whole validation split

    def check(self) -> None:
        _positive(self, "train_size", "val_size", "test_size")
        total = self.train_size + self.val_size + self.test_size
        if total > 150:
            raise ConfigError(f"dataset.train_size + val_size + test_size = {total}, but Iris has 150 examples")


@dataclass
class MNISTConfig:
    name: str = "mnist"
    data_root: str | None = None  # None: $HOEXP_DATA, else ~/.local/share/hoexp/data
    download: bool = False
    val_size: int = 1000  # carved from the training split (stratified, seeded)
    train_size: int | None = None  # a seeded subset of the remaining training images (None: all)
    split_seed: int | None = None
    batch_size: int = 128  # inner-step minibatch; 0 = full batch
    val_batch_size: int = 0  # hypergradient validation minibatch; 0 = the whole validation split

    def check(self) -> None:
        _positive(self, "val_size")
        _non_negative(self, "batch_size", "val_batch_size")
        if self.train_size is not None:
            _positive(self, "train_size")


@dataclass
class PTBConfig:
    name: str = "ptb"
    data_root: str | None = None  # None: $HOEXP_DATA, else ~/.local/share/hoexp/data
    download: bool = False
    batch_size: int = 20  # parallel streams for training (and hypergradient validation windows)
    eval_batch_size: int = 10  # parallel streams for full validation / test evaluation
    bptt: int = 35  # window length
    val_batch_size: int = 0  # unused for text (a hypergradient uses one random validation window)

    def check(self) -> None:
        _positive(self, "batch_size", "eval_batch_size", "bptt")


# ------------------------------------------------------------------------------------------ model
@dataclass
class MLPConfig:
    name: str = "mlp"
    width: int = 128
    depth: int = 2
    activation: str = "relu"
    bias: bool = False

    def check(self) -> None:
        _positive(self, "width")
        if self.depth < 0:
            raise ConfigError(f"model.depth must be >= 0 (number of hidden layers), got {self.depth}")
        from hoexp.model.mlp import ACTIVATIONS

        _choice("model.activation", self.activation, ACTIVATIONS)


@dataclass
class LSTMConfig:
    name: str = "lstm"
    embed_dim: int = 200
    hidden: int = 200
    layers: int = 2
    tie_weights: bool = True

    def check(self) -> None:
        _positive(self, "embed_dim", "hidden", "layers")


# -------------------------------------------------------------------------------- hyperparameters
@dataclass
class WeightDecayConfig:
    name: str = "weight_decay"
    granularity: str = "per_weight"  # global | per_layer | per_weight | layer_and_weight
    init: float = 1e-3
    include: list[str] = field(default_factory=lambda: ["*weight"])
    min: float = 1e-12  # the view exp(raw) is clamped into [min, max] after each outer step
    max: float = 10.0
    offset_scale: float = 0.1  # layer_and_weight: weight i's raw decay = layer + offset_scale · offset_i

    def check(self) -> None:
        from hoexp.hp.weight_decay import GRANULARITIES

        _choice("hp.weight_decay.granularity", self.granularity, GRANULARITIES)
        _positive(self, "offset_scale")
        if not 0 < self.min <= self.init <= self.max:
            raise ConfigError(f"hp.weight_decay.init must lie in [min, max] with min > 0; got min={self.min}, "
                              f"init={self.init}, max={self.max}")
        if not self.include:
            raise ConfigError("hp.weight_decay.include is empty: give parameter-name patterns, e.g. ['*weight']")


@dataclass
class DropoutConfig:
    name: str = "dropout"
    granularity: str = "per_unit"  # per_layer | per_unit | layer_and_unit (a rate per layer + per-unit offsets)
    init: float = 0.2  # initial dropout rate
    temperature: float = 0.1  # of the concrete (relaxed Bernoulli) masks
    relaxation: str = "concrete"  # concrete | gaussian (multiplicative N(1, p/(1-p)) noise)
    offset_scale: float = 0.1  # layer_and_unit: unit j's raw rate = layer + offset_scale · offset_j
    include: list[str] = field(default_factory=lambda: ["*"])  # dropout sites (MLP: input, hidden0, ...)
    min: float = 1e-4
    max: float = 0.95

    def check(self) -> None:
        from hoexp.hp.dropout import GRANULARITIES, RELAXATIONS

        _choice("hp.dropout.granularity", self.granularity, GRANULARITIES)
        _choice("hp.dropout.relaxation", self.relaxation, RELAXATIONS)
        _positive(self, "temperature")
        _positive(self, "offset_scale")
        if not 0 < self.min <= self.init <= self.max < 1:
            raise ConfigError(f"hp.dropout: need 0 < min <= init <= max < 1; got min={self.min}, init={self.init}, "
                              f"max={self.max}")


@dataclass
class LRConfig:
    name: str = "lr"
    granularity: str = "global"  # global | per_layer | per_step (one rate per layer per inner step)
    init: float | None = None  # None: optim.inner.lr
    include: list[str] = field(default_factory=lambda: ["*"])
    min: float = 1e-8
    max: float = 10.0

    def check(self) -> None:
        from hoexp.hp.learning_rate import LR_GRANULARITIES

        _choice("hp.lr.granularity", self.granularity, LR_GRANULARITIES)
        if not 0 < self.min < self.max or (self.init is not None and not self.min <= self.init <= self.max):
            raise ConfigError(f"hp.lr: need 0 < min <= init <= max; got min={self.min}, init={self.init}, max={self.max}")


@dataclass
class MomentumHPConfig:
    name: str = "momentum"
    init: float | None = None  # None: optim.inner.momentum
    include: list[str] = field(default_factory=lambda: ["*"])
    min: float = 0.0
    max: float = 0.999

    def check(self) -> None:
        if not 0 <= self.min < self.max < 1 or (self.init is not None and not self.min < self.init <= self.max):
            raise ConfigError(f"hp.momentum: need 0 <= min < init <= max < 1; got min={self.min}, "
                              f"init={self.init}, max={self.max}")


# ---------------------------------------------------------------------------------------- methods
@dataclass
class NoneMethodConfig:
    """Train with the initial hyperparameters and no HO: the baseline every comparison needs."""

    name: str = "none"

    def check(self) -> None:
        pass


# IFT options shared by neumann, cg, fixed_point, exact, t1t2 (hoexp.method.curvature, hoexp.method.solvers):
#   curvature: hessian | gauss_newton (Jᵀ H_ℓ J + penalty Hessian: PSD, for non-convex nets)
#   damping: μ ≥ 0, solve with C + μI
#   warm_start (neumann, cg, fixed_point): start each solve from the previous outer step's solution
#   alpha: a step > 0, or auto: 1/λ_max of the (damped) operator by power iteration, re-estimated every
#   alpha_every outer steps (neumann, fixed_point, t1t2)
#   hvp: rev_rev (a kept create_graph gradient differentiated again), fwd_rev (jvp of grad, torch.func), or
#   auto (both timed once at the first hypergradient, the faster kept)
#   compile: the hypergradient (products, solver loop, mixed term) as one torch.compile'd pure function,
#   checked once against the eager one (hoexp.method.functional.CompiledIFT)
@dataclass
class NeumannConfig:
    name: str = "neumann"
    terms: int = 5
    alpha: Any = 0.01  # a float > 0, or "auto"
    residual: bool = True  # one more HVP for the exact residual ‖Hu − v‖/‖v‖
    curvature: str = "hessian"
    damping: float = 0.0
    hvp: str = "rev_rev"  # rev_rev | fwd_rev | auto (hoexp.method.functional)
    compile: bool = False  # the whole hypergradient through torch.compile
    warm_start: bool = False
    alpha_every: int = 10

    def check(self) -> None:
        _non_negative(self, "terms")
        _check_ift(self)


@dataclass
class CGConfig:
    name: str = "cg"
    iterations: int = 20
    tol: float = 1e-10
    curvature: str = "hessian"
    damping: float = 0.0
    hvp: str = "rev_rev"  # rev_rev | fwd_rev | auto (hoexp.method.functional)
    compile: bool = False  # the whole hypergradient through torch.compile
    warm_start: bool = False

    def check(self) -> None:
        _non_negative(self, "iterations", "tol")
        _check_ift(self)


@dataclass
class FixedPointConfig:
    name: str = "fixed_point"
    iterations: int = 5
    alpha: Any = 0.01  # a float > 0, or "auto"
    residual: bool = True
    curvature: str = "hessian"
    damping: float = 0.0
    hvp: str = "rev_rev"  # rev_rev | fwd_rev | auto (hoexp.method.functional)
    compile: bool = False  # the whole hypergradient through torch.compile
    warm_start: bool = False
    alpha_every: int = 10

    def check(self) -> None:
        _non_negative(self, "iterations")
        _check_ift(self)
        if self.warm_start and self.iterations == 0:
            raise ConfigError("method=fixed_point: warm_start needs iterations >= 1 (0 would return the carried "
                              "vector unchanged)")


@dataclass
class ExactConfig:
    name: str = "exact"
    max_params: int = 20_000
    curvature: str = "hessian"
    damping: float = 0.0
    hvp: str = "rev_rev"  # rev_rev | fwd_rev | auto (hoexp.method.functional)
    compile: bool = False  # the whole hypergradient through torch.compile

    def check(self) -> None:
        _positive(self, "max_params")
        _check_ift(self)


@dataclass
class T1T2Config:
    """One-step greedy IFT with ``H⁻¹ ≈ αI`` (Luketina et al. 2016): Neumann with 0 terms."""

    name: str = "t1t2"
    alpha: Any = 0.01  # a float > 0, or "auto"
    residual: bool = False  # the residual costs one HVP, a third of this method's cost
    curvature: str = "hessian"
    damping: float = 0.0
    hvp: str = "rev_rev"  # rev_rev | fwd_rev | auto (hoexp.method.functional)
    compile: bool = False  # the whole hypergradient through torch.compile
    alpha_every: int = 10

    def check(self) -> None:
        _check_ift(self)


def _check_ift(obj: Any) -> None:
    """The IFT options above, where ``obj`` has them; a numeric ``alpha`` becomes a float."""
    from hoexp.method.curvature import CURVATURES
    from hoexp.method.functional import HVP_MODES

    _choice("method.curvature", obj.curvature, CURVATURES)
    _choice("method.hvp", obj.hvp, HVP_MODES)
    _non_negative(obj, "damping")
    if obj.compile and getattr(obj, "alpha", None) == "auto":
        raise ConfigError(f"{_where(obj)}compile=true needs a fixed alpha (alpha=auto's power iteration reads the "
                          "host); set method.alpha to a number or method.compile=false")
    if hasattr(obj, "alpha_every"):
        _positive(obj, "alpha_every")
    if not hasattr(obj, "alpha") or obj.alpha == "auto":
        return
    if isinstance(obj.alpha, bool) or not isinstance(obj.alpha, (int, float)):
        raise ConfigError(f"{_where(obj)}alpha must be a number > 0 or auto, got {obj.alpha!r}")
    obj.alpha = float(obj.alpha)
    if not (obj.alpha > 0 and math.isfinite(obj.alpha)):
        raise ConfigError(f"{_where(obj)}alpha must be > 0, got {obj.alpha} (or alpha=auto: 1/λ_max by power "
                          "iteration)")


@dataclass
class FDConfig:
    """First-order hypergradient (hoexp.method.first_order): ``H⁻¹ ≈ αI`` (or ``terms`` Neumann terms) and
    every second derivative a central difference of gradients (DARTS / SAMA): no double backward."""

    name: str = "fd"
    alpha: float = 0.01  # H⁻¹ ≈ αI (DARTS's ξ)
    eps: float = 0.01  # w ± εu with ε = eps/‖u‖: the perturbation's length
    terms: int = 0  # > 0: Neumann terms with finite-difference Hessian-vector products (two gradients each)

    def check(self) -> None:
        _positive(self, "alpha", "eps")
        _non_negative(self, "terms")


@dataclass
class UnrolledConfig:
    """Backpropagate through all ``inner_steps`` steps (memory grows with them)."""

    name: str = "unrolled"
    checkpoint_every: int = 0  # > 0: gradient checkpointing (recompute segments of this many steps)

    def check(self) -> None:
        _non_negative(self, "checkpoint_every")


@dataclass
class TruncatedConfig:
    """Backpropagate through the last ``k`` of the ``inner_steps`` steps (Shaban et al. 2019)."""

    name: str = "truncated"
    k: int = 10
    checkpoint_every: int = 0  # > 0: gradient checkpointing (recompute segments of this many steps)

    def check(self) -> None:
        _positive(self, "k")
        _non_negative(self, "checkpoint_every")


@dataclass
class ForwardConfig:
    """Forward mode: one JVP tangent per hyperparameter; refused above ``max_hparams``."""

    name: str = "forward"
    max_hparams: int = 64
    strategy: str = "hessian"  # hessian | vmap | loop: how tangents are pushed (hoexp.method.forward)
    carry: bool = False  # keep the tangents across outer steps (real-time HO: λ's effect since step 0)
    decay: float = 1.0  # carried tangents are multiplied by this at every outer step (forgetting)

    def check(self) -> None:
        _positive(self, "max_hparams")
        if self.strategy not in ("hessian", "vmap", "loop"):
            raise ConfigError(f"method.strategy must be hessian, vmap or loop, got '{self.strategy}'")
        if not 0 < self.decay <= 1:
            raise ConfigError(f"method.decay must be in (0, 1], got {self.decay}")
        if self.carry and self.strategy == "loop":
            raise ConfigError("method.carry=true needs method.strategy=hessian or vmap (the loop strategy keeps "
                              "no batched tangents)")


@dataclass
class HDConfig:
    """Online hypergradient descent of the inner learning rate (Baydin et al. 2018).

    Replaces ``optim/inner`` by SGD-HD, SGDN-HD or Adam-HD; the hp family stays at its initial value.
    """

    name: str = "hd"
    variant: str = "sgd"  # sgd | sgdn | adam
    beta: float = 1e-3  # hyper-learning rate (the paper: 1e-3 for SGD/SGDN-HD, 1e-7 for Adam-HD)
    lr0: float | None = None  # initial learning rate; None: optim.inner.lr
    momentum: float = 0.9  # sgdn
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam
    eps: float = 1e-8

    def check(self) -> None:
        _choice("method.variant", self.variant, ("sgd", "sgdn", "adam"))
        _non_negative(self, "beta")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"method=hd: momentum must be in [0, 1), got {self.momentum}")


@dataclass
class ReversibleConfig:
    """Reversible learning (Maclaurin et al. 2015): SGD with momentum reversed exactly, no trajectory stored.

    Trains with ``optim/inner`` = ``sgd`` or ``momentum`` (torch's ``buf = μ·buf + g``, ``w −= η·buf``,
    which is Maclaurin's ``v ← γv − (1−γ)g``, ``w ← w + αv`` with ``γ = μ``, ``α = η/(1−μ)``).
    """

    name: str = "reversible"
    radix_bits: int = 50  # fixed-point precision: values are integers times 2^-radix_bits (|w| < 4096)
    momentum_bits: int = 16  # γ is rounded to N/2^momentum_bits

    def check(self) -> None:
        if not 20 <= self.radix_bits <= 56:
            raise ConfigError(f"method=reversible: radix_bits must be in [20, 56], got {self.radix_bits}")
        if not 4 <= self.momentum_bits <= 30:
            raise ConfigError(f"method=reversible: momentum_bits must be in [4, 30], got {self.momentum_bits}")


# ------------------------------------------------------------------------------------- optimizers
@dataclass
class SGDConfig:
    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def check(self) -> None:
        _positive(self, "lr")
        _non_negative(self, "momentum", "dampening", "weight_decay")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ConfigError("nesterov needs momentum > 0 and dampening = 0")


@dataclass
class MomentumConfig(SGDConfig):
    name: str = "momentum"
    momentum: float = 0.9


@dataclass
class NesterovConfig(SGDConfig):
    name: str = "nesterov"
    momentum: float = 0.9
    nesterov: bool = True


@dataclass
class AdamConfig:
    name: str = "adam"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False

    def check(self) -> None:
        _positive(self, "lr", "eps")
        _non_negative(self, "weight_decay")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass
class AdamWConfig(AdamConfig):
    name: str = "adamw"
    weight_decay: float = 1e-2


@dataclass
class RMSpropConfig:
    name: str = "rmsprop"
    lr: float = 1e-2
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False

    def check(self) -> None:
        _positive(self, "lr", "eps")
        _non_negative(self, "weight_decay", "momentum", "alpha")


@dataclass
class AdagradConfig:
    name: str = "adagrad"
    lr: float = 1e-2
    lr_decay: float = 0.0
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10

    def check(self) -> None:
        _positive(self, "lr", "eps")
        _non_negative(self, "lr_decay", "weight_decay", "initial_accumulator_value")


# ------------------------------------------------------------------------------------- the run
RESUME_MODES = ("false", "true", "auto")
NAME = re.compile(r"[A-Za-z0-9_.,+=@-]{1,100}")  # one folder name: nothing that escapes outputs/


@dataclass
class RunConfig:
    """Top-level keys other tools rely on."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"
    outer_steps: int = 100  # hypergradient steps
    inner_steps: int = 100  # training steps between hypergradients
    threads: int = 0  # CPU threads; 0 = auto (1 for small models, where more threads only add overhead)
    eval_every: int = 1  # evaluate train/val/test every N outer steps (and at the last)
    histogram_every: int = 10  # hyperparameter histograms in TensorBoard every N outer steps
    progress: bool = True  # rich bars on a terminal, plain lines otherwise
    reset_inner: bool = False  # re-initialize the weights before every outer step (Maclaurin-style meta-training)
    compile: bool = False  # plain training steps through torch.compile (seconds to compile; faster steps)
    checkpoint_every: int = 10  # outer steps between checkpoints (0: none, except on SIGTERM/SIGINT)
    # auto: continue from checkpoint.pt in the run folder if there is one, else start (over); true: continue
    # (an error without checkpoint); false: start (refused where a run already logged)
    resume: str = "auto"
    max_nonfinite: int = 3  # non-finite hypergradients in a row (each skips its outer update) before aborting
    outer_objective: str = "val"  # val: validation loss; train: final training loss (Maclaurin et al.'s meta-objective)
    precision: str = "fp32"  # fp32 | bf16 | fp16: plain inner training steps under autocast (hoexp.precision)
    name: str = "run"

    def check(self) -> None:
        _non_negative(self, "outer_steps", "inner_steps", "threads", "seed", "checkpoint_every")
        _positive(self, "max_nonfinite")
        _positive(self, "eval_every", "histogram_every")
        if self.outer_objective not in ("val", "train"):
            raise ConfigError(f"outer_objective must be val or train, got '{self.outer_objective}'")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be float32 or float64, got '{self.dtype}'")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got '{self.device}'")
        _choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        self.resume = self.resume.lower()  # YAML booleans arrive as 'True' / 'False'
        _choice("resume", self.resume, RESUME_MODES)
        if not NAME.fullmatch(self.name) or self.name in (".", ".."):
            raise ConfigError(f"name={self.name!r} must be a plain folder name (letters, digits and . _ - + = , @; "
                              "no '/' or spaces): it names the run's folder")


GROUPS: dict[str, dict[str, type]] = {
    "dataset": {"iris": IrisConfig, "mnist": MNISTConfig, "ptb": PTBConfig},
    "model": {"mlp": MLPConfig, "lstm": LSTMConfig},
    "hp": {"weight_decay": WeightDecayConfig, "dropout": DropoutConfig, "lr": LRConfig, "momentum": MomentumHPConfig},
    "method": {"none": NoneMethodConfig, "neumann": NeumannConfig, "cg": CGConfig,
               "fixed_point": FixedPointConfig, "exact": ExactConfig, "t1t2": T1T2Config, "fd": FDConfig,
               "unrolled": UnrolledConfig, "truncated": TruncatedConfig, "forward": ForwardConfig,
               "hd": HDConfig, "reversible": ReversibleConfig},
    "optim": {"sgd": SGDConfig, "momentum": MomentumConfig, "nesterov": NesterovConfig, "adam": AdamConfig,
              "adamw": AdamWConfig, "rmsprop": RMSpropConfig, "adagrad": AdagradConfig},
}


@dataclass
class Spec:
    """A validated experiment: one typed config per group plus the top-level run keys."""

    run: RunConfig
    dataset: Any
    model: Any
    hp: list  # one typed config per tuned family (hp=[weight_decay,dropout] tunes two)
    method: Any
    inner_optim: Any
    outer_optim: Any
    raw: dict  # the composed config as plain containers, for logging

    @property
    def hp_name(self) -> str:
        return "+".join(h.name for h in self.hp)


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise ConfigError(f"{_where(obj)}{n} must be > 0, got {v}")


def _non_negative(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
            raise ConfigError(f"{_where(obj)}{n} must be >= 0, got {v}")


def _where(obj: Any) -> str:
    if isinstance(obj, RunConfig):
        return ""
    for group, options in GROUPS.items():
        if type(obj) in options.values():
            return f"method={obj.name}: " if group == "method" else f"{group}.{obj.name}: "
    return ""


def _choice(key: str, value: str, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{key}='{value}' is not valid; choose one of: {', '.join(sorted(valid))}")


def typed(group: str, node: Any, key: str) -> Any:
    """Merge one group's node into the dataclass its ``name`` selects; check ranges."""
    options = GROUPS[group]
    if not isinstance(node, DictConfig) or "name" not in node:
        raise ConfigError(f"'{key}' must be a config of the '{group}' group with a 'name'; "
                          f"choose one of: {', '.join(sorted(options))}")
    name = node.name
    if name not in options:
        raise ConfigError(f"unknown {key} '{name}'; choose one of: {', '.join(sorted(options))}")
    schema = options[name]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
    except ConfigKeyError as e:
        bad = getattr(e, "key", None) or "?"
        valid = ", ".join(f.name for f in fields(schema) if f.name != "name")
        where = f" for {key}={name}" if key in ("method", "dataset", "model") or key.startswith("optim") else ""
        raise ConfigError(f"unknown key '{key}.{bad}'{where}; valid keys: {valid}") from None
    except ValidationError as e:
        bad = str(getattr(e, "key", None) or "?")
        expected = next((f.type for f in fields(schema) if f.name == bad), "?")
        raise ConfigError(f"{key}.{bad}: {node.get(bad)!r} is not a valid {expected}") from None
    obj: Any = OmegaConf.to_object(merged)  # an instance of schema (every config dataclass has check())
    obj.check()
    return obj


RUN_KEYS = {f.name for f in fields(RunConfig)}
GROUP_KEYS = {"dataset", "model", "hp", "method", "optim"}


def _families(node: Any) -> list:
    """``hp`` holds one node per family, each under its own key (``hp.weight_decay``, ``hp.dropout``)."""
    options = GROUPS["hp"]
    if not isinstance(node, DictConfig) or not node:
        raise ConfigError(f"choose at least one hp family: hp=<family> or hp=[a,b]; families: {', '.join(sorted(options))}")
    out = []
    for node_key, sub in node.items():
        key = str(node_key)  # the family's name (hp keys are strings)
        if key not in options:
            raise ConfigError(f"unknown hp family '{key}'; choose from: {', '.join(sorted(options))}")
        if isinstance(sub, DictConfig) and sub.get("name") not in (None, key):
            raise ConfigError(f"hp.{key}.name must be '{key}'")
        out.append(typed("hp", sub, f"hp.{key}"))
    return out


def validate(cfg: DictConfig) -> Spec:
    """Turn a composed Hydra config into a typed :class:`Spec`, or raise :class:`ConfigError`."""
    top = {k: v for k, v in cfg.items() if k not in GROUP_KEYS and k != "hydra"}
    unknown = {str(k) for k in top} - RUN_KEYS
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(RUN_KEYS))}")
    try:
        run = cast(RunConfig, OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig),
                                                                   OmegaConf.create(top))))
    except ValidationError as e:
        k = str(getattr(e, "full_key", "?"))
        expected = next((f.type for f in fields(RunConfig) if f.name == k), "?")
        raise ConfigError(f"{k}: value {top.get(k)!r} is not a valid {expected}") from None
    run.check()
    optim = cfg.get("optim")
    if not isinstance(optim, DictConfig) or "inner" not in optim or "outer" not in optim:
        raise ConfigError("the config needs optim.inner and optim.outer (groups optim/inner and optim/outer)")
    spec = Spec(
        run=run,
        dataset=typed("dataset", cfg.get("dataset"), "dataset"),
        model=typed("model", cfg.get("model"), "model"),
        hp=_families(cfg.get("hp")),
        method=typed("method", cfg.get("method"), "method"),
        inner_optim=typed("optim", optim.inner, "optim.inner"),
        outer_optim=typed("optim", optim.outer, "optim.outer"),
        raw=cast(dict, OmegaConf.to_container(cfg, resolve=True)),  # a DictConfig's container is a dict
    )
    return spec
