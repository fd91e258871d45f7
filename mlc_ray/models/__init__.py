"""Model registry (``create_model``), MobileNet V1 from the paper, torchvision archs, the ImageTagger."""

from mlc_ray.models import mobilenet_v1 as _mobilenet_v1  # noqa: F401  (registers the model)
from mlc_ray.models import torchvision_models as _torchvision_models  # noqa: F401  (registers models)
from mlc_ray.models.complexity import Complexity, count_macs, count_parameters, model_complexity
from mlc_ray.models.registry import (
    ArchDefaults,
    LoadReport,
    arch_defaults,
    create_model,
    list_models,
    load_pretrained,
    register_model,
    reset_classifier,
    unregister_model,
)
from mlc_ray.models.tagger import ImageTagger, TaggerProbabilities, build_tagger, model_spec

__all__ = [
    "ArchDefaults",
    "arch_defaults",
    "Complexity",
    "ImageTagger",
    "LoadReport",
    "TaggerProbabilities",
    "build_tagger",
    "count_macs",
    "count_parameters",
    "create_model",
    "list_models",
    "load_pretrained",
    "model_complexity",
    "model_spec",
    "register_model",
    "reset_classifier",
    "unregister_model",
]
