"""Recipes: one YAML file (or dict) <-> frozen dataclasses, validated before any work starts.

Every key is checked: an unknown key, a value of the wrong type or an impossible value fails with a
:class:`RecipeError` naming the dotted key (``train.lr``) and what is allowed.

.. code-block:: yaml

    name: digits-dwcnn
    seed: 0
    model: {name: dwcnn, args: {width: 32}}
    data: {name: digits}
    train: {epochs: 12, optimizer: adam, lr: 0.01, batch_size: 64}
    sweep: {bits: [8, 6, 4, 3, 2, W4A8], ranges: [minmax, mse], granularity: channel}
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .quant.spec import ACT_BITS, GRANULARITIES, RANGE_METHODS, WEIGHT_BITS
from .sharpness.build import SharpnessConfig
from .train.config import TrainConfig


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the key and the allowed values."""


@dataclass(frozen=True)
class ModelConfig:
    """Which model: a registered ``name`` — or ``factory: "package.module:function"``, any importable
    callable returning an ``nn.Module`` — with constructor ``args`` (``num_classes``/``in_channels``
    default to the dataset's when the constructor takes them), and optionally pretrained ``weights``
    (a state-dict file loaded strictly, e.g. torchvision's ``mobilenet_v2-b0353104.pth``).
    ``freeze_batchnorm``: BatchNorm statistics and dropout stay in eval mode during training (for
    fine-tuning a pretrained model on a few samples; see :func:`qready.models.freeze_batchnorm`)."""

    name: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    factory: str | None = None
    freeze_batchnorm: bool = False

    def __post_init__(self) -> None:
        if self.factory is None:
            object.__setattr__(self, "name", self.name or "dwcnn")
        elif self.name is not None:
            raise RecipeError("model: give either 'name' (a registered model) or 'factory' "
                              "('package.module:function'), not both")

    @property
    def label(self) -> str:
        """The registered name or the factory path, for messages and reports."""
        return self.name or str(self.factory)


@dataclass(frozen=True)
class DataConfig:
    """Which dataset: a registered name, where its files are (CIFAR, ImageNet) and loader options."""

    name: str = "digits"
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    eval_batch_size: int = 512

    def __post_init__(self) -> None:
        if self.eval_batch_size < 1:
            raise RecipeError(f"data.eval_batch_size must be a positive int; got {self.eval_batch_size}")


@dataclass(frozen=True)
class SweepConfig:
    """The PTQ sweep after training: bit settings (``8`` weight-only, ``"W4A8"`` weights and
    activations), range methods, granularity, the first/last-layer policy and the PTQ ``method``
    (``rtn`` or ``gptq``, with ``method_options`` such as ``{act_order: true}``; optional
    ``bias_correction``: ``true``/``layer``, or ``model`` to match the float model's mean layer outputs).
    ``confidence``: the float model's top-1 probability from which an input
    counts as confident in the agreement-on-confident-inputs column."""

    bits: tuple[int | str, ...] = (8, 6, 4, 3, 2)
    ranges: tuple[str, ...] = ("minmax", "mse")
    granularity: str = "channel"
    symmetric: bool = True
    group_size: int | None = None
    first_last: int | str = "same"
    calib_batches: int = 8
    method: str = "rtn"
    bias_correction: bool | str = False
    method_options: dict[str, Any] = field(default_factory=dict)
    confidence: float = 0.5

    def __post_init__(self) -> None:
        from .evaluate.sweep import parse_bit_setting
        from .quant.ptq import PTQ_METHODS, build_method
        from .quant.ptq.bias_correction import bias_correction_target

        if self.method not in PTQ_METHODS:
            raise RecipeError(f"sweep.method must be one of {PTQ_METHODS.names()}; got {self.method!r}")
        try:
            build_method(self.method, dict(self.method_options))
        except (TypeError, ValueError) as err:
            raise RecipeError(f"sweep.method_options: {err}") from None
        try:
            bias_correction_target(self.bias_correction)
        except ValueError as err:
            raise RecipeError(f"sweep.{err}") from None

        for i, setting in enumerate(self.bits):
            try:
                parse_bit_setting(setting)
            except (TypeError, ValueError) as err:
                raise RecipeError(f"sweep.bits[{i}]: {err}") from None
        for r in self.ranges:
            if r not in RANGE_METHODS:
                raise RecipeError(f"sweep.ranges: {r!r} is not one of {list(RANGE_METHODS)}")
        if self.granularity not in GRANULARITIES:
            raise RecipeError(f"sweep.granularity must be one of {list(GRANULARITIES)}; got {self.granularity!r}")
        if self.granularity == "group" and not self.group_size:
            raise RecipeError("sweep.group_size is required when sweep.granularity is 'group'")
        if self.first_last not in ("same", "float") and not (isinstance(self.first_last, int) and 2 <= self.first_last <= 8):
            raise RecipeError(f"sweep.first_last must be 'same', 'float' or a bit width 2-8; got {self.first_last!r}")
        if self.calib_batches < 1:
            raise RecipeError(f"sweep.calib_batches must be a positive int; got {self.calib_batches}")
        if not 0.0 <= self.confidence <= 1.0:
            raise RecipeError(f"sweep.confidence must be a probability in [0, 1]; got {self.confidence}")


@dataclass(frozen=True)
class RegularizerConfig:
    """One regularizer added to the training loss (see :func:`qready.regularizers.build`)."""

    name: str
    weight: float = 0.01
    select: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise RecipeError(f"regularizers[].weight must be >= 0; got {self.weight}")


def compress_methods() -> tuple[list[str], list[str]]:
    """The names ``compress.method`` accepts: (QAT methods, palettization methods), from their registries."""
    from .quant.palettize import PALETTIZERS
    from .quant.qat import QAT_METHODS

    return QAT_METHODS.names(), PALETTIZERS.names()


def _compress_option_names(method: str) -> list[str]:
    """The keys ``compress.options`` may hold for ``method``."""
    import inspect

    from .quant.palettize import PALETTIZERS
    from .quant.qat import QAT_METHODS, prepare_qat

    if method in QAT_METHODS:
        params = inspect.signature(prepare_qat).parameters.values()
        return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY] + ["delta_update", "mixed"]
    if method == "cluster":  # options of the cluster regularizer trained before the snap
        from .regularizers import option_names

        return ["weight", *option_names("cluster")]
    return [f.name for f in dataclasses.fields(PALETTIZERS.get(method))]
EXPORT_FORMATS: tuple[str, ...] = ("none", "packed", "onnx", "coreml")
COREML_BITS: tuple[int, ...] = (4, 8)


@dataclass(frozen=True)
class CompressConfig:
    """The compression stage after training: a QAT method (``ste``/``lsq``/``ewgs``, fine-tuned ``epochs``
    epochs) or a palettization method: DKM (``dkm``, fine-tuned), learnable representatives (``cluster``:
    trained with the cluster regularizer, then snapped) or a post-training palettizer (``kmeans``, no
    training). ``options`` are the method's own (e.g. ``{delta: 0.001}`` for EWGS, ``{tau: 0.0001}`` for
    DKM); an unknown option is an error listing the method's options."""

    method: str = "lsq"
    w_bits: int = 4
    a_bits: int | None = None
    epochs: int = 5
    lr: float = 1e-3
    quantizer_lr: float | None = None
    first_last: int | str = "same"
    options: dict[str, Any] = field(default_factory=dict)
    sharpness: SharpnessConfig | None = None

    def __post_init__(self) -> None:
        from .quant.palettize import PALETTIZERS

        qat, palettizers = compress_methods()
        if self.method not in (*qat, *palettizers):
            raise RecipeError(f"compress.method must be one of {qat + palettizers}; got {self.method!r}")
        allowed = _compress_option_names(self.method)
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise RecipeError(f"compress.options.{unknown[0]} is not an option of method {self.method!r}; "
                              f"allowed: {', '.join(allowed)}")
        if self.sharpness is not None:
            if self.method not in qat:
                raise RecipeError(f"compress.sharpness needs a QAT method {qat}; got {self.method!r}")
        if self.w_bits not in WEIGHT_BITS:
            raise RecipeError(f"compress.w_bits must be one of {list(WEIGHT_BITS)}; got {self.w_bits!r}")
        palettizer = PALETTIZERS.get(self.method) if self.method in palettizers else None
        if palettizer is not None and self.a_bits is not None:
            raise RecipeError(f"compress.a_bits: method {self.method!r} palettizes weights only; remove a_bits")
        if palettizer is not None and self.w_bits not in palettizer.supported_bits:
            raise RecipeError(f"compress.w_bits must be one of {list(palettizer.supported_bits)} for method "
                              f"{self.method!r}; got {self.w_bits}")
        if self.a_bits is not None and self.a_bits not in ACT_BITS:
            raise RecipeError(f"compress.a_bits must be one of {list(ACT_BITS)} or null; got {self.a_bits!r}")
        if self.epochs < 0 or (self.epochs == 0 and not (palettizer is not None and palettizer.post_training)):
            raise RecipeError(f"compress.epochs must be >= 1 for method {self.method!r}; got {self.epochs}")
        if self.lr <= 0 or (self.quantizer_lr is not None and self.quantizer_lr <= 0):
            raise RecipeError("compress.lr and compress.quantizer_lr must be > 0")
        if self.first_last not in ("same", "float") and not (isinstance(self.first_last, int) and 1 <= self.first_last <= 8):
            raise RecipeError(f"compress.first_last must be 'same', 'float' or a bit width 1-8; got {self.first_last!r}")


@dataclass(frozen=True)
class ExportConfig:
    """What ``qready run`` exports: ``packed`` (bit-packed codes + scales/LUTs in safetensors),
    ``onnx`` (QuantizeLinear/DequantizeLinear), ``coreml`` (an ``.mlpackage`` with compressed weights;
    needs the ``coreml`` extra) or ``none``. Without a compress stage the exported model is the PTQ
    model at ``bits`` (per-channel min-max; Core ML: 4 or 8 bits)."""

    format: str = "none"
    bits: int = 4

    def __post_init__(self) -> None:
        if self.bits not in WEIGHT_BITS:
            raise RecipeError(f"export.bits must be one of {list(WEIGHT_BITS)}; got {self.bits!r}")
        if self.format not in EXPORT_FORMATS:
            raise RecipeError(f"export.format must be one of {list(EXPORT_FORMATS)}; got {self.format!r}")
        if self.format == "coreml" and self.bits not in COREML_BITS:
            raise RecipeError(f"export.bits must be one of {list(COREML_BITS)} for Core ML; got {self.bits!r}")


@dataclass(frozen=True)
class Recipe:
    """A whole run: model, data, training and the PTQ sweep, plus the seed and where outputs go."""

    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    regularizers: tuple[RegularizerConfig, ...] = ()
    sharpness: SharpnessConfig | None = None
    compress: CompressConfig | None = None
    sweep: SweepConfig = field(default_factory=SweepConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    grid: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists), ready for YAML/JSON."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_SCALARS: dict[type, tuple[Any, str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to type hint ``tp`` or raise a RecipeError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        concrete = [o for o in options if o is not type(None)]
        if len(concrete) == 1:
            return _coerce(value, concrete[0], key)
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except RecipeError as err:
                errors.append(str(err))
        allowed = " or ".join(_type_name(o) for o in options)
        raise RecipeError(f"recipe key '{key}': expected {allowed}; got {value!r}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key '{key}': expected a mapping; got {value!r}")
        return build_dataclass(tp, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"recipe key '{key}': expected a list; got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key '{key}': expected a mapping; got {value!r}")
        return dict(value)
    if tp in _SCALARS:
        accepts, expected = _SCALARS[tp]
        if not accepts(value):
            raise RecipeError(f"recipe key '{key}': expected {expected}; got {value!r}")
        return float(value) if tp is float else value
    return value


def build_dataclass(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``data``, checking keys and types recursively."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"'{prefix}.{unknown[0]}'" if prefix else f"'{unknown[0]}'"
        raise RecipeError(f"unknown recipe key {where}; allowed keys{' in ' + repr(prefix) if prefix else ''}: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (ValueError, TypeError) as err:
        label = f"recipe section '{prefix}'" if prefix else "recipe"
        raise RecipeError(f"{label}: {err}") from None


def check_names(recipe: Recipe) -> None:
    """Check the model, dataset and regularizer names against the registries (imports torch)."""
    from .data import list_datasets
    from .models import list_models
    from .regularizers import list_regularizers, option_names

    if recipe.model.factory is not None:
        from .models import import_factory

        try:
            import_factory(recipe.model.factory)
        except ValueError as err:
            raise RecipeError(f"model.factory: {err}") from None
    elif recipe.model.name not in list_models():
        raise RecipeError(f"model.name {recipe.model.name!r} is unknown; valid names: {', '.join(list_models())}")
    if recipe.data.name not in list_datasets():
        raise RecipeError(f"data.name {recipe.data.name!r} is unknown; valid names: {', '.join(list_datasets())}")
    for i, reg in enumerate(recipe.regularizers):
        if reg.name not in list_regularizers():
            raise RecipeError(
                f"regularizers[{i}].name {reg.name!r} is unknown; valid names: {', '.join(list_regularizers())}"
            )
        allowed = option_names(reg.name)
        unknown = sorted(set(reg.options) - set(allowed))
        if unknown:
            raise RecipeError(f"regularizers[{i}].options.{unknown[0]} is not an option of {reg.name!r}; "
                              f"allowed: {', '.join(allowed) or 'none'}")


def recipe_from_dict(data: dict[str, Any] | None) -> Recipe:
    """Validated :class:`Recipe` from a dict (e.g. parsed YAML)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping at the top level; got {type(data).__name__}")
    recipe = build_dataclass(Recipe, data)
    check_names(recipe)
    return recipe


def load_recipe(source: str | Path | dict[str, Any]) -> Recipe:
    """Load and validate a recipe from a YAML file path or a dict."""
    if isinstance(source, dict):
        return recipe_from_dict(source)
    path = Path(source)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {err}") from None
    return recipe_from_dict(data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a recipe dict (a new dict)."""
    out = _plain(data)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        node = out
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write ``recipe`` as YAML (round-trips through :func:`load_recipe`)."""
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
