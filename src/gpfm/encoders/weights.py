"""Encoder weights: read a local file safely, map each official key layout onto our modules, fetch from a hub.

Files: `.safetensors`, or `.pt/.pth/.bin/.ckpt` through `torch.load(weights_only=True)` (nothing is unpickled).
Layouts (`WeightSource.layout`): timm (as is), dinov2-teacher (GPFM.pth), hf-vit (Phikon), hf-dinov2 (Phikon-v2),
hf-clip (PLIP), conch (open_clip-style `visual.`), ctranspath (timm 0.5.4 Swin), resnet-trunc (full ResNet-50).
A state dict that does not fit is a GpfmError naming missing / unexpected / mis-shaped keys.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from gpfm.encoders.registry import EncoderRecord, WeightSource
from gpfm.io import GpfmError, read_json

log = logging.getLogger("gpfm")

SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
StateDict = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------- reading
def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Tensors of a weights file, unwrapped from common containers ('teacher', 'state_dict', 'model', 'module')."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise GpfmError(f"{path}: unknown weights format; use one of {', '.join(SUFFIXES)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise GpfmError(f"{path}: weights file not found") from e
    except Exception as e:  # pickle with objects, truncated file, not a checkpoint
        raise GpfmError(f"{path}: cannot read weights safely ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        "re-save it as .safetensors or a plain tensor state dict") from e
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in ("teacher", "state_dict", "model", "module") if isinstance(obj.get(k), dict)),
                     None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise GpfmError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise GpfmError(f"{path}: no tensors found (keys: {', '.join(list(obj)[:5])})")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


# ------------------------------------------------------------------------------------------- layouts
def _keep_prefix(sd: StateDict, prefix: str) -> StateDict:
    """Keys under `prefix` (stripped) when any exist, else the dict unchanged."""
    if not any(k.startswith(prefix) for k in sd):
        return sd
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _rename(sd: StateDict, rules: list[tuple[str, str]], drop: tuple[str, ...] = ()) -> StateDict:
    out = {}
    for k, v in sd.items():
        if any(re.search(d, k) for d in drop):
            continue
        for pat, rep in rules:
            k2 = re.sub(pat, rep, k)
            if k2 != k:
                k = k2
                break
        out[k] = v
    return out


def _fuse_qkv(sd: StateDict, pattern: str) -> StateDict:
    """Concatenate separate q/k/v projections ('<blk>.<q>.weight' ...) into timm's 'blocks.i.attn.qkv'."""
    out, parts = {}, {}
    for k, v in sd.items():
        m = re.match(pattern, k)
        if m:
            parts.setdefault((m["i"], m["p"]), {})[m["which"][0]] = v  # q/query, k/key, v/value
        else:
            out[k] = v
    for (i, p), d in parts.items():
        if set(d) != {"q", "k", "v"}:
            raise GpfmError(f"incomplete q/k/v projections for block {i} ({', '.join(sorted(d))})")
        out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([d["q"], d["k"], d["v"]], dim=0)
    return out


def _resample_pos(sd: StateDict, model: torch.nn.Module, key: str = "pos_embed", vit: Any = None) -> StateDict:
    """Bicubically resample an absolute position embedding trained at another grid size (timm's rule)."""
    vit = vit if vit is not None else model
    own = model.state_dict().get(key)
    if key in sd and own is not None and sd[key].shape != own.shape and sd[key].ndim == 3:
        from timm.layers import resample_abs_pos_embed

        npt = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        sd[key] = resample_abs_pos_embed(sd[key], new_size=list(vit.patch_embed.grid_size), num_prefix_tokens=npt,
                                         interpolation="bicubic", antialias=True, verbose=False)
    return sd


def _timm(sd: StateDict, model: torch.nn.Module) -> StateDict:
    sd = _keep_prefix(sd, "model.") if not any(k.startswith("model.") for k in model.state_dict()) else sd
    return _resample_pos(sd, model) if hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens") else sd


def _dinov2_teacher(sd: StateDict, model: torch.nn.Module) -> StateDict:
    """GPFM.pth['teacher'] / DINOv2 training checkpoints: keep `backbone.`, flatten block chunks, drop mask_token."""
    sd = _keep_prefix(_keep_prefix(sd, "teacher."), "backbone.")
    sd = _rename(sd, [(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1."), (r"^register_tokens$", "reg_token")],
                 drop=(r"^mask_token$",))
    return _timm(sd, model)


_HF_VIT = [
    (r"^embeddings\.cls_token$", "cls_token"), (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^layernorm\.", "norm."),
]
_HF_V5 = [(r"^(encoder\.layer\.\d+\.attention)\.q_proj\.", r"\1.attention.query."),
          (r"^(encoder\.layer\.\d+\.attention)\.k_proj\.", r"\1.attention.key."),
          (r"^(encoder\.layer\.\d+\.attention)\.v_proj\.", r"\1.attention.value."),
          (r"^(encoder\.layer\.\d+\.attention)\.o_proj\.", r"\1.output.dense.")]
_HF_QKV = r"^encoder\.layer\.(?P<i>\d+)\.attention\.attention\.(?P<which>query|key|value)\.(?P<p>weight|bias)$"


def _hf_vit(sd: StateDict, model: torch.nn.Module) -> StateDict:
    """Hugging Face ViTModel / Dinov2Model keys -> timm VisionTransformer."""
    sd = _keep_prefix(_keep_prefix(sd, "vit."), "dinov2.")
    sd = _rename(_rename(sd, [(r"^layers\.", "encoder.layer.")]), _HF_V5)  # transformers>=5 names -> hub names
    sd = _fuse_qkv(sd, _HF_QKV)
    sd = _rename(sd, _HF_VIT, drop=(r"^pooler\.", r"^classifier\.", r"^embeddings\.mask_token$"))
    return _timm(sd, model)


_HF_CLIP = [
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."), (r"^pre_layrnorm\.", "norm_pre."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."), (r"^post_layernorm\.", "norm."),
]


def _hf_clip(sd: StateDict, model: torch.nn.Module) -> StateDict:
    """Hugging Face CLIPModel / CLIPVisionModelWithProjection -> timm CLIP ViT + bias-free projection head."""
    proj = sd.get("visual_projection.weight")
    sd = _keep_prefix(sd, "vision_model.")
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    if "embeddings.class_embedding" in sd:
        sd["cls_token"] = sd.pop("embeddings.class_embedding").reshape(1, 1, -1)
    if "embeddings.position_embedding.weight" in sd:
        sd["pos_embed"] = sd.pop("embeddings.position_embedding.weight").unsqueeze(0)
    sd = _fuse_qkv(sd, r"^encoder\.layers\.(?P<i>\d+)\.self_attn\.(?P<which>q|k|v)_proj\.(?P<p>weight|bias)$")
    sd = _rename(sd, _HF_CLIP)
    if proj is not None:
        sd["head.weight"] = proj
    return _timm(sd, model)


def _conch(sd: StateDict, model: torch.nn.Module) -> StateDict:
    """CONCH checkpoint (open_clip CoCa): keep `visual.`, drop the caption pooler and the text towers."""
    sd = _keep_prefix(sd, "visual.")
    sd = {k: v for k, v in sd.items() if not k.startswith(("attn_pool_caption.", "ln_caption.", "head."))}
    return _resample_pos(sd, model, key="trunk.pos_embed", vit=model.trunk)


def _ctranspath(sd: StateDict, model: torch.nn.Module) -> StateDict:
    """TransPath's ctranspath.pth (timm 0.5.4 Swin): drop buffers and head, move downsample to the next stage."""
    old = "layers.0.downsample.reduction.weight" in sd
    out = {}
    for k, v in sd.items():
        if "relative_position_index" in k or k.endswith("attn_mask") or k.startswith("head."):
            continue
        if old:
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) + 1}.downsample", k)
        out[k] = v
    return out


def _resnet_trunc(sd: StateDict, model: torch.nn.Module) -> StateDict:
    """A full (timm/torchvision) ResNet-50 state dict -> the layer3-truncated trunk."""
    return {k: v for k, v in _timm(sd, model).items() if not k.startswith(("layer4.", "fc."))}


CONVERTERS: dict[str, Callable[[StateDict, torch.nn.Module], StateDict]] = {
    "timm": _timm, "dinov2-teacher": _dinov2_teacher, "hf-vit": _hf_vit, "hf-dinov2": _hf_vit,
    "hf-clip": _hf_clip, "conch": _conch, "ctranspath": _ctranspath, "resnet-trunc": _resnet_trunc,
}


# ------------------------------------------------------------------------------------------- fitting
def _listing(keys: list[str], n: int = 4) -> str:
    more = f", ... (+{len(keys) - n})" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def fit_state_dict(model: torch.nn.Module, sd: StateDict, source: str, what: str) -> None:
    """Load `sd` strictly; anything missing, unexpected or mis-shaped is one GpfmError that names the keys."""
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or not re.match(r"^(head|fc)\.", k)}  # classifier we dropped
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing ({_listing(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({_listing(unexpected)})" if unexpected else "",
                 f"{len(shapes)} mis-shaped ({_listing(shapes, 2)})" if shapes else ""]
        raise GpfmError(f"{source}: weights do not fit {what}: {'; '.join(p for p in parts if p)}; "
                        "pass the checkpoint made for this encoder (or choose the encoder these weights belong to)")
    model.load_state_dict(sd, strict=True)


def load_weights(encoder: Any, path: str | os.PathLike) -> None:
    """Read, map and load a weights file into `encoder.model`; records its sha256 on the encoder."""
    record: EncoderRecord = encoder.record
    layout = record.weights.layout if record.weights else "timm"
    sd = CONVERTERS[layout](read_state_dict(path), encoder.model)
    fit_state_dict(encoder.model, sd, str(path), f"{record.name} ({record.architecture})")
    encoder.weights_sha256 = file_digest(path, record.weights.checksum if record.weights else None)
    encoder.weights_source = str(path)


def save_weights(encoder: Any, path: str | os.PathLike) -> Path:
    """Write `encoder.model`'s state dict as safetensors (loads back with create_encoder(name, weights=path))."""
    from safetensors.torch import save_file

    from gpfm.io import atomic_path

    sd = {k: v.detach().cpu().contiguous() for k, v in encoder.model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={"encoder": encoder.name})
    return Path(path)


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike, checksum: str | None = None) -> str:
    """sha256 of a file (cached per process); warns when a known official checksum differs."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        sha, md5 = hashlib.sha256(), hashlib.md5()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 23):
                sha.update(chunk)
                md5.update(chunk)
        _DIGESTS[key] = sha.hexdigest()
        if checksum:
            algo, _, want = checksum.partition(":")
            got = md5.hexdigest() if algo == "md5" else sha.hexdigest()
            if got != want:
                log.warning("%s: %s %s differs from the official %s (fine-tuned or another release?)",
                            path, algo, got, want)
    return _DIGESTS[key]


# ---------------------------------------------------------------------------------- finding the file
def find_export(weights: str | os.PathLike | None) -> dict | None:
    """A timm-style export: {'file', 'config'} when `weights` is a folder (or a file) with config.json beside."""
    if weights is None:
        return None
    p = Path(weights).expanduser()
    folder, file = (p, p / "model.safetensors") if p.is_dir() else (p.parent, p)
    cfg_path = folder / "config.json"
    if not (cfg_path.is_file() and file.is_file() and file.suffix == ".safetensors"):
        return None
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        return None
    return {"file": file, "config": cfg}


def record_from_export(name: str, export: dict) -> EncoderRecord:
    """An EncoderRecord built from a timm hub-style config.json (architecture, model_args, pretrained_cfg, gpfm)."""
    cfg, card = export["config"], export["config"].get("gpfm", {}) or {}
    pc = cfg.get("pretrained_cfg", {}) or {}
    size = int((pc.get("input_size") or [3, 224, 224])[-1])
    crop_pct = float(pc.get("crop_pct", 1.0))
    feature = card.get("feature", "cls")
    return EncoderRecord(
        name=name, architecture=f"{cfg['architecture']} (exported)", kind="timm-export",
        model_args={"arch": cfg["architecture"], **(cfg.get("model_args") or {})}, feature=feature,
        feature_text=feature, dim=int(cfg.get("num_features", 0)), input_size=size,
        resize_size=int(size / crop_pct) if crop_pct < 1 else size,
        interpolation=pc.get("interpolation", "bicubic"), mean=tuple(pc.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(pc.get("std", (0.229, 0.224, 0.225))), mpp=float(card.get("mpp", 0.5)),
        tile_size=int(card.get("tile_size", size)),
        weights=WeightSource(layout="timm", url=str(export["file"])), notes=str(card.get("source", "")))


def resolve_weights(record: EncoderRecord, weights: str | os.PathLike | None, export: dict | None) -> Path | None:
    """The weights file to load (None: random init for tiny encoders). GpfmError says where the file is expected."""
    if export is not None:
        return Path(export["file"])
    src = record.weights
    if weights is None:
        return None if src is None else hub_file(record)
    p = Path(weights).expanduser()
    names = src.filenames if src and src.filenames else ("model.safetensors", "pytorch_model.bin")
    if p.is_dir():
        found = [p / n for n in names if (p / n).is_file()] or sorted(q for q in p.iterdir() if q.suffix in SUFFIXES)
        if len(found) != 1 and not (found and found[0].name in names):
            raise GpfmError(f"{p}: expected one weights file ({' or '.join(names)}) for {record.name}, "
                            f"found {len(found)}; pass the file itself")
        p = found[0]
    if not p.is_file():
        where = f" (the official file is {names[0]} from {src.where})" if src else ""
        raise GpfmError(f"{p}: weights file not found for {record.name}{where}")
    return p


def hub_file(record: EncoderRecord, timeout: float = 3.0) -> Path:
    """Path of the encoder's official file: Hugging Face cache first, then the hub when reachable."""
    src = record.weights
    assert src is not None
    fix = (f"download {src.filenames[0]} from {src.where}"
           + (" (gated: accept its terms there, then set HF_TOKEN)" if src.gated else "")
           + f" and pass --weights PATH (or weights=PATH) for {record.name}")
    if not src.hub_id:
        raise GpfmError(f"{record.name}: no hub copy of the weights is known; {fix}")
    try:
        import huggingface_hub as hf
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError as e:
        raise GpfmError(f"{record.name}: huggingface_hub is not installed; {fix}") from e
    for fn in src.filenames:
        try:
            return Path(hf.hf_hub_download(src.hub_id, fn, local_files_only=True))
        except (LocalEntryNotFoundError, EntryNotFoundError, FileNotFoundError):
            continue
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or not reachable(endpoint, timeout):
        why = "HF_HUB_OFFLINE is set" if offline else f"{urlparse(endpoint).hostname} is unreachable"
        raise GpfmError(f"{record.name}: weights are not in the Hugging Face cache and {why}; {fix}")
    token = os.environ.get("HF_TOKEN") or None
    for fn in src.filenames:
        try:
            return Path(hf.hf_hub_download(src.hub_id, fn, token=token, etag_timeout=timeout))
        except EntryNotFoundError:
            continue
        except Exception as e:  # gated without token, revoked access, network drop
            raise GpfmError(f"{record.name}: hub download of {src.hub_id}/{fn} failed "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); {fix}") from e
    raise GpfmError(f"{record.name}: none of {', '.join(src.filenames)} exists in {src.hub_id}; {fix}")


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` s (DNS included; never hangs)."""
    u = urlparse(url)
    host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)
