"""The model registry: one name -> one constructor, and ``create_model`` to build (and load) any of them.

timm-style: a constructor is a function ``fn(*, num_labels, width, dropout) -> nn.Module`` decorated
with ``@register_model``; its ``__name__`` is the registry name. Every registered model takes float
NCHW normalised input and returns logits ``(B, num_labels)``; its head ends in dropout + linear.

Each registered name carries its ``ArchDefaults`` (timm's ``pretrained_cfg`` pattern): the input size it
was designed for, its own width and whether it takes a width multiplier at all, the smallest input it
can take, and the normalisation its (ImageNet-trained) weights expect. ``arch_defaults(name)`` returns
them; ``TrainConfig`` fills every field the user left unset from them.

``pretrained`` is a state-dict file (local path or ``s3://``), read with ``torch.load(weights_only=True)``.
Nothing is ever downloaded. Accepted layouts:

* torchvision's (``classifier.1.weight``, ``fc.weight``, ...), mapped through the model's
  ``legacy_key_map`` attribute;
* our own (``create_model(...).state_dict()``), optionally wrapped in DDP (``module.``) or
  ``torch.compile`` (``_orig_mod.``) prefixes;
* an ``ImageTagger`` state dict (keys prefixed ``backbone.``);
* a checkpoint dict holding one of the above under ``model`` / ``state_dict`` / ``model_state_dict``.

When the checkpoint's classifier has a different label count, the classifier is re-initialised (and
that is logged). Any other missing, unexpected or mis-shaped key is an error that lists the keys.
"""

from __future__ import annotations

import difflib
import io
import logging
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import torch
from torch import nn

log = logging.getLogger(__name__)

ModelFn = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFn] = {}

# Prefixes that wrappers add to every key; stripped before matching.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys under which training checkpoints commonly nest the model's state dict.
_NESTED_KEYS = ("model", "state_dict", "model_state_dict")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArchDefaults:
    """What an architecture needs to be trained and served right, kept with its registry entry."""

    input_size: int = 224  # the input side it was designed (and ImageNet-trained) for
    min_input_size: int = 32  # five stride-2 stages: below 32 px the last feature map is empty
    width: float = 1.0  # its own channel width (MobileNet's alpha = 1 is the paper's model)
    width_multiplier: bool = False  # only MobileNet V1/V2 take another width
    normalization: str = "imagenet"  # what torchvision/paper weights were trained with
    mean: tuple[float, float, float] = IMAGENET_MEAN  # RGB on the 0..1 scale
    std: tuple[float, float, float] = IMAGENET_STD
    dropout: float = 0.2  # before the final linear layer

    def check_width(self, name: str, width: float) -> None:
        """ValueError when ``width`` is not one this architecture can be built with."""
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width!r}")
        if not self.width_multiplier and float(width) != self.width:
            raise ValueError(
                f"{name} has no width multiplier (its width is {self.width:g}, got {width:g}): "
                "leave width unset, or use mobilenet_v1 / mobilenet_v2 for another width"
            )

    def check_input_size(self, name: str, size: int) -> None:
        if size < self.min_input_size:
            raise ValueError(
                f"image_size {size} is too small for {name}: it needs >= {self.min_input_size} px "
                f"(its default is {self.input_size})"
            )


_DEFAULTS: dict[str, ArchDefaults] = {}


@overload
def register_model(fn: ModelFn, /) -> ModelFn: ...
@overload
def register_model(*, defaults: ArchDefaults) -> Callable[[ModelFn], ModelFn]: ...


def register_model(
    fn: ModelFn | None = None, /, *, defaults: ArchDefaults | None = None
) -> ModelFn | Callable[[ModelFn], ModelFn]:
    """Decorator: register ``fn`` under ``fn.__name__`` (``@register_model`` or
    ``@register_model(defaults=ArchDefaults(...))``). Registering a name twice is an error."""

    def register(fn: ModelFn) -> ModelFn:
        name = fn.__name__
        if name in _REGISTRY:
            raise ValueError(
                f"model {name!r} is already registered (by {_REGISTRY[name].__module__}); pick another name"
            )
        _REGISTRY[name] = fn
        _DEFAULTS[name] = defaults or ArchDefaults()
        return fn

    return register(fn) if fn is not None else register


def arch_defaults(name: str) -> ArchDefaults:
    """The registered defaults of ``name`` (ValueError listing the known names when unknown)."""
    if name not in _REGISTRY:
        raise _unknown_model_error(name)
    return _DEFAULTS[name]


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def unregister_model(name: str) -> None:
    """Remove ``name`` from the registry (tests that register throw-away models clean up with this)."""
    _REGISTRY.pop(name, None)
    _DEFAULTS.pop(name, None)


def _unknown_model_error(name: str) -> ValueError:
    known = list_models()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown model {name!r}{hint}; known models: {', '.join(known)}")


def create_model(
    name: str,
    num_labels: int,
    *,
    width: float | None = None,
    dropout: float | None = None,
    pretrained: str | None = None,
) -> nn.Module:
    """Build the registered model ``name`` with ``num_labels`` outputs.

    ``width`` is the channel width multiplier (MobileNet's alpha; only archs whose defaults say
    ``width_multiplier`` take another than their own), ``dropout`` the probability of the dropout in front of the final linear layer, ``pretrained``
    an optional state-dict file (local or s3://) to start from (see the module docstring).
    """
    if name not in _REGISTRY:
        raise _unknown_model_error(name)
    if isinstance(num_labels, bool) or not isinstance(num_labels, numbers.Integral) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
    num_labels = int(num_labels)
    defaults = arch_defaults(name)
    width = defaults.width if width is None else width
    dropout = defaults.dropout if dropout is None else dropout
    defaults.check_width(name, width)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    model = _REGISTRY[name](num_labels=num_labels, width=float(width), dropout=float(dropout))
    if pretrained:
        load_pretrained(model, pretrained)
    return model


# ---- pretrained weights -------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: the source, how many tensors it loaded, the re-initialised head."""

    source: str
    loaded: int
    reinitialised_head: bool = False
    ignored: list[str] = field(default_factory=list)  # e.g. num_batches_tracked missing in old files


def _read_state_bytes(uri: str) -> bytes:
    try:
        from mlc_ray import storage
    except ImportError:  # storage layer not importable: local files only
        storage = None
    if storage is not None:
        try:
            return storage.read_bytes(uri)
        except FileNotFoundError:
            raise FileNotFoundError(f"pretrained weights {uri!r} not found") from None
    if uri.startswith("s3://"):
        raise ValueError(f"cannot read {uri!r}: mlc_ray.storage (needed for s3://) is not available")
    path = Path(uri.removeprefix("file://"))
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {uri!r} not found")
    return path.read_bytes()


def _load_state_dict_file(uri: str) -> dict[str, torch.Tensor]:
    data = _read_state_bytes(uri)
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for bad files
        raise ValueError(
            f"{uri}: not a loadable state dict ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "save one with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{uri}: expected a non-empty state dict (name -> tensor), got {type(obj).__name__}")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"{uri}: the file holds no tensors; expected a model state dict")
    return state


def _normalise_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes, take an ImageTagger's backbone, map torchvision names to ours."""
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    key_map: dict[str, str] = getattr(model, "legacy_key_map", {})
    own = model.state_dict()
    return {(key_map[k] if k not in own and k in key_map else k): v for k, v in state.items()}


def _head(model: nn.Module) -> tuple[str, nn.Linear]:
    key = getattr(model, "head_key", None)
    if key is None:
        raise ValueError(f"{type(model).__name__} has no head_key attribute; registered models must set one")
    head = model.get_submodule(key)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__}.{key} is {type(head).__name__}, expected nn.Linear")
    return key, head


def reset_classifier(model: nn.Module) -> None:
    """Re-initialise the final linear layer of a registered model (small normal weights, zero bias)."""
    _, head = _head(model)
    nn.init.normal_(head.weight, 0.0, 0.01)
    nn.init.zeros_(head.bias)


def _preview(keys: list[str], n: int = 8) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_pretrained(model: nn.Module, uri: str) -> LoadReport:
    """Load the state-dict file ``uri`` into ``model`` (a registered model) in place; see module docstring."""
    state = _normalise_keys(_load_state_dict_file(uri), model)
    own = model.state_dict()
    head_key, head = _head(model)
    head_names = {f"{head_key}.weight", f"{head_key}.bias"}

    reinit = False
    src_head = state.get(f"{head_key}.weight")
    if not any(k in state for k in head_names):
        log.info("%s: no classifier in the file (a backbone): the classifier keeps its fresh init", uri)
        reinit = True
    elif (
        src_head is not None
        and tuple(src_head.shape) != tuple(head.weight.shape)
        and src_head.ndim == 2
        and src_head.shape[1] == head.in_features
    ):
        log.info(
            "%s: checkpoint classifier has %d labels, model has %d: re-initialising the classifier",
            uri,
            src_head.shape[0],
            head.out_features,
        )
        state = {k: v for k, v in state.items() if k not in head_names}
        reinit = True

    mismatched = [
        f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = [k for k in own if k not in state and not (reinit and k in head_names)]
    ignored = [k for k in missing if k.endswith("num_batches_tracked")]  # absent from old torchvision files
    missing = [k for k in missing if k not in ignored]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"{uri}: does not match {type(model).__name__}: {len(missing)} missing keys "
            f"[{_preview(missing)}], {len(unexpected)} unexpected keys [{_preview(unexpected)}]; "
            "is it a state dict of the same arch (torchvision or mlc_ray layout)?"
        )
    if mismatched:
        raise ValueError(
            f"{uri}: {len(mismatched)} tensors have other shapes than {type(model).__name__}: "
            f"{_preview(mismatched)}; was it saved from the same arch and width?"
        )
    model.load_state_dict(state, strict=False)
    if reinit:
        reset_classifier(model)
    log.info("%s: loaded %d tensors into %s", uri, len(state), type(model).__name__)
    return LoadReport(source=uri, loaded=len(state), reinitialised_head=reinit, ignored=ignored)
