"""ImageNet initialisation of a pose backbone: timm's weights or a local classification checkpoint.

Both papers start their HRNets from ImageNet classification weights (docs/methods.md 1.2).
``model.pretrained: true`` takes timm's own weights (the ``timm/<model>.<tag>`` repository on the
Hugging Face hub: downloaded into huggingface_hub's cache when online, read from that cache
when offline); ``model.weights: FILE`` takes the same kind of file from disk (a state dict
saved with ``torch.save`` or a ``.safetensors`` file, what users download). Either way the file
is a *classification* checkpoint: the tensors the pose backbone has are loaded, the classifier
(and HRNet's classification-only ``incre_modules`` / ``downsamp_modules`` / ``final_layer``,
MobileNet's pruned deeper blocks) are skipped and reported, and anything else fails by name.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kdray.config import ConfigError
from kdray.console import log

if TYPE_CHECKING:
    import torch
    from torch import nn

    from kdray.config import ModelConfig

HF_FILE = "model.safetensors"    # what every timm hub repository carries
_PREFIXES = ("module.", "backbone.", "model.")  # DDP, a kdray PoseModel, timm's getter wrapper


def backbone_weights(model_cfg: ModelConfig, key: str = "model") -> str:
    """The file whose weights initialise the backbone of ``model_cfg`` ("" = random init).

    ``key`` is the dotted prefix of the ModelConfig (``teacher.model``) for the error messages.
    Resolving ``pretrained`` may download; an entry point calls this before any compute.
    """
    if model_cfg.pretrained and model_cfg.weights:
        raise ConfigError(f"{key}.pretrained and {key}.weights are both set: pick one (weights "
                          f"is a local copy of what pretrained downloads)")
    if model_cfg.pretrained:
        return str(pretrained_file(model_cfg.backbone, key))
    return model_cfg.weights


def pretrained_file(backbone: str, key: str = "model") -> Path:
    """timm's ImageNet checkpoint of ``backbone`` (a key of BACKBONES), from the Hugging Face
    hub or, offline (``HF_HUB_OFFLINE=1`` or no network), from huggingface_hub's cache."""
    import timm
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    from kdray.nn.backbones import BACKBONES
    repo = timm.models.get_pretrained_cfg(BACKBONES[backbone].timm_name).hf_hub_id
    try:
        return Path(hf_hub_download(repo, HF_FILE))
    except (OSError, HfHubHTTPError) as e:  # offline and not cached, no network, gated, ...
        from huggingface_hub import constants
        reason = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
                  else f"hub unreachable or refused: {type(e).__name__}")
        raise ConfigError(
            f"{key}.pretrained: timm's ImageNet weights for {backbone} are not in the Hugging "
            f"Face cache ({constants.HF_HUB_CACHE}) and cannot be downloaded ({reason}); download "
            f"https://huggingface.co/{repo}/resolve/main/{HF_FILE} on a machine with network "
            f"and set {key}.weights=FILE with {key}.pretrained=false") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or ``torch.save`` (``weights_only=True``), with the
    common nestings (``state_dict``, ``model``) and key prefixes removed."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path))
    else:  # never unpickle arbitrary objects (docs/operations.md, "Security notes")
        import torch
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"model.weights {path}: expected a state dict, got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        while k.startswith(_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def classifier_keys(timm_name: str) -> set[str]:
    """Every tensor name of timm's full classification model (built on the meta device: no
    memory, no init cost)."""
    import timm
    import torch
    with torch.device("meta"):
        return set(timm.create_model(timm_name, pretrained=False).state_dict())


def _some(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_weights(module: nn.Module, timm_name: str, path: str) -> str:
    """Load a classification checkpoint into the feature backbone ``module``; return the report.

    Every backbone tensor must be in the file with its shape (BatchNorm's counters excepted);
    file tensors of the classification model that the backbone lacks are skipped, as are a kdray
    PoseModel's ``head.*``; any other file key fails, named. Printed on the console.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.weights: no such file {path!r}")
    from timm.models._features import FeatureGetterNet
    target = module.model if isinstance(module, FeatureGetterNet) else module
    own = target.state_dict()
    sd = read_state_dict(p)
    full = classifier_keys(timm_name)
    extra = sorted(k for k in sd if k not in own)
    skipped = [k for k in extra if k in full or k.startswith("head.")]
    unknown = [k for k in extra if k not in skipped]
    missing = sorted(k for k in own if k not in sd and not k.endswith("num_batches_tracked"))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(own)
              if k in sd and sd[k].shape != own[k].shape]
    problems = [f"{what}: {_some(keys)}" for what, keys in (
        (f"keys that are not {timm_name}'s", unknown), ("backbone keys missing", missing),
        ("shapes differ (file vs backbone)", shapes)) if keys]
    if problems:
        raise ValueError(f"model.weights {path}: not a {timm_name} checkpoint; "
                         + "; ".join(problems))
    target.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    loaded = sum(1 for k in own if k in sd)
    report = (f"{p.name}: loaded {loaded} backbone tensors into {timm_name}; skipped "
              f"{len(skipped)} the pose backbone does not use"
              + (f" ({_some(skipped)})" if skipped else ""))
    log(report)
    return report


def model_configs(cfg):
    """(dotted key, ModelConfig) for every network section of an ExperimentConfig."""
    from dataclasses import fields, is_dataclass

    from kdray.config import ModelConfig
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, ModelConfig):
            yield f.name, value
        elif is_dataclass(value):
            yield from ((f"{f.name}.{k}", m) for k, m in model_configs(value))


def check_pretrained(cfg, skip: tuple[str, ...] = ()) -> None:
    """Resolve every ``*.model.pretrained`` in ``cfg`` (an ExperimentConfig) now, so a pipeline
    downloads or fails before any compute; ``skip``: dotted prefixes of networks that come
    from a given checkpoint (``teacher.model`` under ``--teacher``)."""
    for key, model_cfg in model_configs(cfg):
        if model_cfg.pretrained and key not in skip:
            backbone_weights(model_cfg, key)
