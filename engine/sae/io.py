"""SAEs on disk: the SAELens folder format (read and written) and the Gemma Scope layouts (read).

An SAELens folder holds ``cfg.json``, ``sae_weights.safetensors`` (the tensors of
:meth:`engine.sae.base.SAE.parameter_shapes`) and optionally ``sparsity.safetensors`` (``sparsity
[d_sae]``: log10 firing density). Configs written by SAELens 6 (nested ``metadata``) and by older
versions (flat ``hook_point``, ``activation_fn_str``, ``activation_fn_kwargs`` and the whole training
runner config) load. Every top-level field is either understood, a known training-only setting (kept
under :attr:`SAEConfig.extra` and written back), or an error: nothing is silently ignored. Gemma Scope
folders (``params.npz``, or ``config.json`` + ``params.safetensors``) load through
:mod:`engine.sae.gemma_scope`. Nothing is unpickled, and a folder that fails any check loads nothing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from engine.core.devices import DTYPES
from engine.core.fileio import atomic_save_tensors, atomic_write_json
from engine.sae import gemma_scope
from engine.sae.base import SAE, SAEConfig, SAELoadError, dtype_name, parameter_shapes
from engine.sae.hooks import SAECompatibilityError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"

_CORE = {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
         "reshape_activations", "k", "rescale_acts_by_decoder_norm", "d_out", "norm_scaling_factor", "metadata",
         "meta"}
_LEGACY = {"activation_fn", "activation_fn_str", "activation_fn_kwargs", "finetuning_scaling_factor"}
# SAELens metadata that older configs keep at the top level (moved under "metadata"), and renamed keys
METADATA_KEYS = {"model_name", "hook_name", "hook_name_out", "hook_head_index", "hook_head_index_out", "hf_hook_name",
                 "hf_hook_name_out", "model_class_name", "model_from_pretrained_kwargs", "prepend_bos",
                 "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path",
                 "sae_lens_version", "sae_lens_training_version", "hook_layer", "dataset_trust_remote_code"}
_RENAMED = {"hook_point": "hook_name", "hook_point_layer": "hook_layer", "hook_point_head_index": "hook_head_index"}
# settings of SAELens's training runner (any version) that do not change what a trained SAE computes
TRAINING_FIELDS = {
    "act_store_device", "activations_mixing_fraction", "adam_beta1", "adam_beta2", "autocast", "autocast_lm",
    "aux_loss_coefficient", "b_dec_init_method", "cached_activations_path", "checkpoint_path", "compile_llm",
    "compile_sae", "dead_feature_threshold", "dead_feature_window", "decoder_heuristic_init", "decoder_init_norm",
    "decoder_orthogonal_init", "disable_concat_sequences", "eval_batch_size_prompts", "eval_every_n_wandb_logs",
    "expansion_factor", "feature_sampling_window", "finetuning_method", "finetuning_tokens", "from_pretrained_path",
    "hook_eval", "hook_point_eval", "init_encoder_as_decoder_transpose", "is_dataset_tokenized",
    "jumprelu_bandwidth", "jumprelu_init_threshold", "jumprelu_sparsity_loss_mode", "jumprelu_ste_to_input",
    "jumprelu_tanh_scale", "l0_coefficient", "l0_warm_up_steps", "l1_coefficient", "l1_warm_up_steps",
    "llm_compilation_mode", "llm_device", "log_activations_store_to_wandb", "log_optimizer_state_to_wandb",
    "log_to_wandb", "logger", "lp_norm", "lr", "lr_decay_steps", "lr_end", "lr_scheduler_name", "lr_warm_up_steps",
    "model_kwargs", "mse_loss_normalization", "n_batches_for_norm_estimate", "n_batches_in_buffer", "n_checkpoints",
    "n_eval_batches", "n_restart_cycles", "noise_scale", "normalize_sae_decoder", "output_path",
    "pre_act_loss_coefficient", "prefetch_llm_batches", "resume", "resume_from_checkpoint", "run_name",
    "sae_compilation_mode", "save_final_checkpoint", "scale_sparsity_penalty_by_decoder_norm", "seed",
    "sequence_separator_token", "store_batch_size", "store_batch_size_prompts", "streaming", "target_l0",
    "tokens_per_buffer", "topk_threshold_lr", "train_batch_size", "train_batch_size_tokens", "training_tokens",
    "use_cached_activations", "use_chat_formatting", "use_ghost_grads", "use_matryoshka_aux_loss",
    "use_sparse_activations", "verbose", "wandb_entity", "wandb_id", "wandb_log_frequency", "wandb_project",
    "latent_explorer",
}


# --- config parsing -------------------------------------------------------------------------
def _metadata(raw: dict) -> dict:
    """Top-level metadata keys (old layouts) overlaid by the nested ``metadata`` object."""
    metadata = {key: raw[key] for key in METADATA_KEYS if raw.get(key) is not None}
    for old, new in _RENAMED.items():
        if raw.get(old) is not None and new not in metadata:
            metadata[new] = raw[old]
    nested = raw.get("metadata", raw.get("meta"))
    if nested is not None and not isinstance(nested, dict):
        raise SAELoadError("The SAE config's 'metadata' is not a JSON object.")
    metadata.update({key: value for key, value in (nested or {}).items() if value is not None})
    return metadata


def _architecture_and_k(raw: dict) -> tuple[str, Any]:
    """The architecture and k, also from pre-6 ``activation_fn_str`` / ``activation_fn_kwargs``."""
    activation = raw.get("activation_fn_str") or raw.get("activation_fn")
    kwargs = raw.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict) or set(kwargs) - {"k"}:
        raise SAELoadError(f"The SAE config's activation_fn_kwargs {kwargs!r} are not understood (only 'k' is).")
    if activation not in (None, "relu", "topk"):
        raise SAELoadError(f"The SAE uses activation function '{activation}', which is not supported.")
    architecture = raw.get("architecture")
    if architecture is None or (architecture == "standard" and activation == "topk"):
        architecture = "topk" if activation == "topk" else (architecture or "standard")
    return str(architecture), raw["k"] if "k" in raw else kwargs.get("k")


def _normalization(raw: dict) -> str:
    normalize = raw.get("normalize_activations", "none")
    if normalize in (None, False):
        return "none"
    if normalize is True:  # SAELens < 6 wrote a boolean for the April-2024 scaling
        return "expected_average_only_in"
    if normalize == "covariance_whitening":
        raise SAELoadError("The SAE expects whitened inputs (normalize_activations: covariance_whitening), but its "
                           "whitening statistics were not folded into the weights.")
    return str(normalize)


def _check_fields(raw: dict) -> None:
    known = _CORE | _LEGACY | METADATA_KEYS | set(_RENAMED) | TRAINING_FIELDS
    unknown = sorted(key for key in raw if key not in known)
    if unknown:
        raise SAELoadError(f"The SAE config field '{unknown[0]}' is not understood by this engine, "
                           "so the SAE is not loaded.")
    if raw.get("reshape_activations", "none") not in ("none", None):
        raise SAELoadError("SAEs on reshaped activations (hook_z) are not supported.")
    if raw.get("finetuning_scaling_factor"):
        raise SAELoadError("The SAE uses a finetuning scaling factor, which SAELens 6 and this engine do not support.")


def parse_config(raw: Any) -> SAEConfig:
    """A ``cfg.json`` dictionary of any SAELens version -> :class:`SAEConfig` (or a one-sentence error)."""
    if not isinstance(raw, dict):
        raise SAELoadError("The SAE config is not a JSON object.")
    _check_fields(raw)
    architecture, k = _architecture_and_k(raw)
    extra = {key: value for key, value in raw.items() if key in TRAINING_FIELDS}
    factor = raw.get("norm_scaling_factor")
    return SAEConfig(d_in=raw.get("d_in"), d_sae=raw.get("d_sae"), architecture=architecture, k=k,
                     rescale_acts_by_decoder_norm=raw.get("rescale_acts_by_decoder_norm", False),
                     d_out=raw.get("d_out"), dtype=raw.get("dtype", "float32"),
                     apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
                     normalize_activations=_normalization(raw), norm_scaling_factor=factor,
                     metadata=_metadata(raw), extra=extra)


# --- tensors --------------------------------------------------------------------------------
def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise SAELoadError(f"'{path}' is not a readable safetensors file ({type(exc).__name__}: {exc}).") from exc


def check_tensors(cfg: SAEConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor the architecture needs, with the right shape, floating point and finite; nothing else."""
    if "scaling_factor" in tensors and bool((tensors["scaling_factor"] == 1).all()):
        del tensors["scaling_factor"]  # older SAELens wrote an all-ones finetuning scale
    expected = parameter_shapes(cfg)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise SAELoadError(f"{source} lacks {', '.join(missing)} needed by a {cfg.architecture} SAE.")
    unused = [name for name in tensors if name not in expected]
    if unused:
        raise SAELoadError(f"{source} holds '{unused[0]}', which a {cfg.architecture} SAE does not use.")
    for name, shape in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise SAELoadError(f"{source}: '{name}' has shape {tuple(tensor.shape)} but the config "
                               f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}, d_out={cfg.width_out}) implies {shape}.")
        if not tensor.is_floating_point():
            raise SAELoadError(f"{source}: '{name}' has dtype {tensor.dtype}; SAE weights must be floating point.")
        if not bool(torch.isfinite(tensor).all()):
            raise SAELoadError(f"{source}: '{name}' contains NaN or infinite values.")


def build_sae(cfg: SAEConfig, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu",
              dtype: torch.dtype | str | None = None, source: str = WEIGHTS_FILE) -> SAE:
    """An SAE of ``cfg``'s architecture holding ``tensors`` (checked first), in eval mode."""
    check_tensors(cfg, tensors, source)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype_name(dtype)]
    target = dtype or DTYPES[cfg.dtype]
    sae = SAE(cfg, device=device, dtype=target)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(tensors[name].to(device=device, dtype=target))
    return sae.eval()


# --- folders --------------------------------------------------------------------------------
def read_config(folder: str | Path) -> SAEConfig:
    """The config of an SAELens folder, or the one implied by a Gemma Scope folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SAELoadError(f"The SAE folder '{folder}' does not exist.")
    path = folder / CFG_FILE
    if not path.is_file():
        if gemma_scope.is_gemma_scope_folder(folder):
            return gemma_scope.read(folder)[0]
        raise SAELoadError(f"The folder '{folder}' has no {CFG_FILE}, so it is not an SAELens-format SAE "
                           "(nor a Gemma Scope folder).")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SAELoadError(f"'{path}' is not valid JSON ({exc}).") from exc
    return parse_config(raw)


def load_sae(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None) -> SAE:
    """Load an SAELens-format or Gemma Scope folder; every check passes before anything is returned."""
    folder = Path(folder)
    if not (folder / CFG_FILE).is_file() and gemma_scope.is_gemma_scope_folder(folder):
        cfg, tensors, source = gemma_scope.read(folder)
        return build_sae(cfg, tensors, device, dtype, source)
    cfg = read_config(folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise SAELoadError(f"The folder '{folder}' has no {WEIGHTS_FILE}.")
    return build_sae(cfg, read_safetensors(weights_path), device, dtype)


def save_sae(sae: SAE, folder: str | Path, sparsity: torch.Tensor | None = None,
             extra_cfg: dict | None = None) -> Path:
    """Save in the SAELens 6 layout; ``extra_cfg`` lands under ``cfg["latent_explorer"]``.

    A known ``norm_scaling_factor`` is folded into the saved weights (``normalize_activations: none``),
    so SAELens, which ignores that field, computes the same as this engine.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg.to_dict()
    cfg["dtype"] = dtype_name(sae.W_enc.dtype)
    tensors = sae.state_tensors()
    factor = cfg.pop("norm_scaling_factor", None)
    if factor is not None and cfg["normalize_activations"] == "expected_average_only_in":
        tensors.update(W_enc=tensors["W_enc"] * factor, W_dec=tensors["W_dec"] / factor,
                       b_dec=tensors["b_dec"] / factor)
        cfg["normalize_activations"] = "none"
    if extra_cfg:
        cfg["latent_explorer"] = {**cfg.get("latent_explorer", {}), **extra_cfg}
    atomic_save_tensors(folder / WEIGHTS_FILE, tensors)
    if sparsity is not None:
        if tuple(sparsity.shape) != (sae.d_sae,):
            raise SAELoadError(f"The sparsity vector has shape {tuple(sparsity.shape)}, expected ({sae.d_sae},).")
        atomic_save_tensors(folder / SPARSITY_FILE, {"sparsity": sparsity.float()})
    atomic_write_json(folder / CFG_FILE, cfg)  # written last: a folder with a cfg.json is complete
    return folder


def load_sparsity(folder: str | Path) -> torch.Tensor | None:
    """The log10 feature sparsity ``[d_sae]`` saved beside the weights, or None when there is none."""
    path = Path(folder) / SPARSITY_FILE
    if not path.is_file():
        return None
    tensors = read_safetensors(path)
    if "sparsity" not in tensors or tensors["sparsity"].ndim != 1:
        raise SAELoadError(f"'{path}' holds no 1-D tensor named 'sparsity'.")
    return tensors["sparsity"].float()


def is_sae_folder(folder: str | Path) -> bool:
    """An SAELens folder (``cfg.json`` + weights) or a Gemma Scope folder."""
    folder = Path(folder)
    return ((folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()) or \
        gemma_scope.is_gemma_scope_folder(folder)


def list_saes(root: str | Path | None = None) -> list[Path]:
    """SAE folders under ``root`` (default ``cache_root()/"saes"``), newest first."""
    if root is None:
        from engine.core.models import cache_root

        root = cache_root() / "saes"
    root = Path(root)
    if not root.is_dir():
        return []
    candidates = {path.parent for name in (CFG_FILE, *gemma_scope.WEIGHT_FILES) for path in root.rglob(name)}
    found = [folder for folder in candidates if is_sae_folder(folder)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def describe(sae: SAE) -> dict:
    """A short JSON-able summary of an SAE."""
    cfg = sae.cfg
    out = {"architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": cfg.k,
           "dtype": str(sae.W_enc.dtype).replace("torch.", ""), "hook_name": cfg.hook_name,
           "model_name": cfg.model_name, "normalize_activations": cfg.normalize_activations,
           "expansion_factor": round(cfg.d_sae / cfg.d_in, 3), "transcoder": sae.is_transcoder}
    if cfg.rescale_acts_by_decoder_norm:
        out["rescale_acts_by_decoder_norm"] = True
    try:
        out["site"], out["layer"] = cfg.site()
    except SAECompatibilityError:
        pass
    if sae.is_transcoder:
        out.update(d_out=cfg.d_out, hook_name_out=cfg.hook_name_out)
        try:
            out["site_out"], out["layer_out"] = cfg.output_site()
        except SAECompatibilityError:
            pass
    if cfg.norm_scaling_factor is not None:
        out["norm_scaling_factor"] = cfg.norm_scaling_factor
    return out
