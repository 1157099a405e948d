"""The UKD trainer: self-distillation (DINO + iBOT + KoLeo, EMA teacher) plus expert distillation, on one
process or under torchrun (DDP; FSDP2 for large students), resumable at any world size (GPFM-METHOD.md §2).

Total loss (§2.5): dino_global + dino_local + ibot + koleo + sum_e (<e>_cls + <e>_patch), each term already
multiplied by its weight; metrics.jsonl logs the weighted terms.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpfm import dist
from gpfm.config import load_config, save_config, to_dict
from gpfm.io import GpfmError, append_jsonl, ensure_writable_dir, progress, read_jsonl, write_text
from gpfm.pretrain import checkpoint as ck
from gpfm.pretrain import losses as L
from gpfm.pretrain.config import PretrainConfig
from gpfm.pretrain.data import TileSource, TileStream, make_loader, make_source
from gpfm.pretrain.experts import Expert, build_experts, student_normalize
from gpfm.pretrain.model import build_student, load_init, param_groups
from gpfm.pretrain.schedules import values_at

log = logging.getLogger("gpfm.pretrain")


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


class Trainer:
    """Builds everything (experts first: bad expert input fails before any training) and runs the loop.

    `source` replaces the configured data source (any TileSource or TileStream); `expert_factory` replaces
    `gpfm.encoders.create_encoder` (tests)."""

    def __init__(self, cfg: PretrainConfig, out_dir: str | Path, source: TileSource | TileStream | None = None,
                 expert_factory=None, quiet: bool = False):
        self.cfg, self.out, self.quiet = cfg, Path(out_dir), quiet
        self.env = dist.init_process_group(self._device_kind())
        self.device = self._device()
        if self.device.type == "cuda":  # GPFM trained with TF32 matmuls
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.env.is_main:
            ensure_writable_dir(self.out)
        self.experts: list[Expert] = build_experts(cfg.distill, self.device, expert_factory)
        lc = cfg.loss
        self.self_distill = lc.dino_weight > 0 or lc.ibot_weight > 0
        self.use_ibot = lc.ibot_weight > 0
        if not self.self_distill and not self.experts:
            raise GpfmError("nothing to train: all self-distillation weights are 0 and distill.experts is empty")
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        dims = {e.key: (e.cls_dim, e.token_dim if e.has_patch_term else None) for e in self.experts}
        self.student = build_student(cfg.model, cfg.heads, cfg.crops.global_size, self.self_distill,
                                     self.use_ibot, dims)
        self.init_report = load_init(self.student.backbone, cfg.model.init, cfg.model.init_strict) \
            if cfg.model.init else None
        self.student.backbone.mask_token.requires_grad_(self.use_ibot)
        self.teacher = self.student.make_teacher()
        self.student.to(self.device)
        self.teacher.to(self.device)
        self.model = self._wrap()  # before the optimizer: FSDP2 replaces the parameters
        self.groups = param_groups(self.student, self.student.backbone.n_blocks, cfg.optim.layer_decay,
                                   cfg.optim.patch_embed_lr_mult)
        self.optimizer = torch.optim.AdamW(self.groups, lr=0.0, betas=tuple(cfg.optim.betas))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.run.precision == "fp16")
        k = cfg.heads.prototypes
        self.centers = {"dino": torch.zeros(k, device=self.device),
                        "ibot": torch.zeros(cfg.heads.ibot_prototypes or k, device=self.device)}
        ps = self.student.backbone.patch_size
        self.grid = (cfg.crops.global_size // ps, cfg.crops.global_size // ps)
        self.source = source
        self.start_step = 0

    # -------------------------------------------------------------------------------------------- setup
    def _device_kind(self) -> str:
        d = self.cfg.run.device
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise GpfmError("run.device is cuda but no GPU is visible; use run.device=cpu or auto")
        return ("cuda" if torch.cuda.is_available() else "cpu") if d == "auto" else d

    def _device(self) -> torch.device:
        kind = self._device_kind()
        return torch.device(f"cuda:{self.env.local_rank}") if kind == "cuda" else torch.device(kind)

    def _wrap(self) -> torch.nn.Module:
        if not self.env.is_distributed:
            return self.student
        if self.cfg.run.fsdp:
            from torch.distributed.fsdp import fully_shard

            for part in (self.student, self.teacher):
                for block in part.backbone.vit.blocks:
                    fully_shard(block)
            for unit in (self.teacher.backbone, self.teacher.dino_head, self.teacher.ibot_head, self.student):
                if unit is not None:  # the teacher's parts are called one by one, so each is a unit
                    fully_shard(unit)
            return self.student
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.student, device_ids=ids)

    def autocast(self):
        p = self.cfg.run.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    def expert_sizes(self) -> tuple[int, ...]:
        if self.cfg.distill.view != "rerender":
            return ()
        sizes = set()
        for e in self.experts:
            if e.input_hw[0] != e.input_hw[1]:
                raise GpfmError(f"expert '{e.key}': non-square input {e.input_hw}; use distill.view=student")
            sizes.add(e.input_hw[0])
        return tuple(sorted(sizes))

    # -------------------------------------------------------------------------------------------- state
    def state(self, step: int) -> dict[str, Any]:
        sd_student, sd_teacher, sd_opt = self._full_state()
        return {"student": sd_student, "teacher": sd_teacher, "optimizer": sd_opt,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "centers": {k: v.cpu() for k, v in self.centers.items()},
                "experts": {e.key: e.standardizer_state() for e in self.experts},
                "data": {"next_sample": step * self.cfg.data.batch_size, "seed": self.cfg.run.seed},
                "config": to_dict(self.cfg), "arch": self.student.backbone.arch,
                "model_args": self.student.backbone.model_args, "world_size": self.env.world_size,
                "init": self.init_report}

    def _full_state(self):
        """Full (unsharded) state dicts, the optimizer's keyed by parameter name: the same layout whether the run
        is plain, DDP or FSDP2, so any checkpoint resumes under any of them."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        o = self._sd_options()
        return (get_model_state_dict(self.student, options=o), get_model_state_dict(self.teacher, options=o),
                get_optimizer_state_dict(self.student, self.optimizer, options=o))

    def _sd_options(self, strict: bool = True):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=self.env.is_distributed, strict=strict)

    def load(self, ckpt: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        changed = ck.config_changes(ckpt["config"], to_dict(self.cfg))
        if changed:
            raise GpfmError(f"{ckpt['path']}: the config differs from the run's ({', '.join(changed[:5])}); "
                            "resume with the same config or start a new --out")
        saved = [g["names"] for g in ckpt["optimizer"]["param_groups"]]
        if saved != [g["names"] for g in self.optimizer.param_groups]:
            raise GpfmError(f"{ckpt['path']}: its optimizer parameter groups do not match this student")
        o = self._sd_options()
        set_model_state_dict(self.student, ckpt["student"], options=o)
        set_model_state_dict(self.teacher, ckpt["teacher"], options=o)
        # not strict: a still-frozen last layer has no optimizer state yet, exactly as in an uninterrupted run
        set_optimizer_state_dict(self.student, self.optimizer, ckpt["optimizer"], options=self._sd_options(False))
        if ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        for k, v in ckpt["centers"].items():
            self.centers[k] = v.to(self.device)
        for e in self.experts:
            e.load_standardizer_state(ckpt["experts"].get(e.key, {}))
        self.init_report = ckpt.get("init")
        self.start_step = int(ckpt["step"])

    # -------------------------------------------------------------------------------------------- one step
    def compute_losses(self, batch: dict[str, Any], step: int, temp: float) -> tuple[dict, dict]:
        """Weighted loss terms and monitors for one batch (forward only)."""
        cfg, lc, dev = self.cfg, self.cfg.loss, self.device
        x01 = batch["global"].to(dev, non_blocking=True)
        gl = student_normalize(x01)
        lo = student_normalize(batch["local"].to(dev, non_blocking=True)) if self.self_distill else None
        masks = batch["masks"].to(dev) if self.use_ibot else None
        terms: dict[str, torch.Tensor] = {}
        monitors: dict[str, float] = {}
        with torch.no_grad():
            targets = {}
            for e in self.experts:
                view = cfg.distill.view
                imgs = batch["experts"][e.input_hw[0]].to(dev) if view == "rerender" else x01
                targets[e.key] = e.targets(gl if view == "compat" else imgs, view == "compat", self.autocast)
            if self.self_distill:
                with self.autocast():
                    t_cls, t_patch, _ = self.teacher.backbone(gl)
                    t_dino = self.teacher.dino_head(t_cls)
                    t_ibot = self.teacher.patch_head()(t_patch[masks]) if self.use_ibot else None
                self._reshard_teacher()
                t_dino_p = self._teacher_probs(t_dino, "dino", temp)
                t_ibot_p = self._teacher_probs(t_ibot, "ibot", temp) if self.use_ibot else None
                monitors["teacher_entropy"] = float(L.entropy(t_dino_p))
                monitors["center_norm"] = float(self.centers["dino"].norm())
        with self.autocast():
            out = self.model(gl, lo, masks)
        monitors["feature_std"] = float(out["cls_g"].detach().float().std(0).mean())
        if self.self_distill:
            n_g = 2
            s_dino = list(out["dino"][: gl.shape[0]].chunk(n_g))
            if lo is not None and cfg.crops.n_local:
                s_dino += list(out["dino"][gl.shape[0]:].chunk(cfg.crops.n_local))
            if lc.dino_weight > 0:
                glob, loc = L.dino_loss(s_dino, list(t_dino_p.chunk(n_g)), lc.student_temp)
                terms["dino_global"], terms["dino_local"] = lc.dino_weight * glob, lc.dino_weight * loc
            if self.use_ibot:
                terms["ibot"] = lc.ibot_weight * L.ibot_loss(out["ibot"], t_ibot_p, masks, lc.student_temp)
            if lc.koleo_weight > 0:
                terms["koleo"] = lc.koleo_weight * sum(L.koleo_loss(c, lc.koleo_group_size)
                                                       for c in out["cls_g"].chunk(n_g))
        for e in self.experts:
            cls_t, tok_t = targets[e.key]
            terms[f"{e.key}_cls"] = e.cfg.cls_weight * L.cosine_loss(out["proj_cls"][e.key], cls_t)
            if e.has_patch_term:
                terms[f"{e.key}_patch"] = e.cfg.patch_weight * L.expert_patch_loss(
                    out["proj_patch"][e.key], tok_t, out["grid"], e.grid)
        return terms, monitors

    def _reshard_teacher(self) -> None:
        """FSDP2 keeps a root unit's weights gathered after forward; the teacher's units are all roots."""
        for unit in (self.teacher.backbone, self.teacher.dino_head, self.teacher.ibot_head):
            if hasattr(unit, "reshard"):
                unit.reshard()

    @torch.no_grad()
    def _teacher_probs(self, logits: torch.Tensor, which: str, temp: float) -> torch.Tensor:
        lc = self.cfg.loss
        if lc.centering == "sinkhorn":
            return L.sinkhorn_knopp(logits, temp, lc.sinkhorn_iters)
        probs = L.softmax_center(logits, self.centers[which], temp)
        self.centers[which] = L.update_center(self.centers[which], logits, lc.center_momentum)
        return probs

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        cfg = self.cfg
        sched = values_at(step, cfg.run.steps, cfg.optim, cfg.data.batch_size)
        for g in self.optimizer.param_groups:
            g["lr"] = sched["lr"] * g["lr_mult"]
            g["weight_decay"] = sched["wd"] * g["wd_mult"]
        torch.manual_seed(step_seed(cfg.run.seed, step, self.env.rank))
        terms, monitors = self.compute_losses(batch, step, sched["teacher_temp"])
        values = self._guard(terms, monitors, step)
        total = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if sched["last_layer_frozen"]:
            for g in self.optimizer.param_groups:
                if g["last_layer"]:
                    for p in g["params"]:
                        p.grad = None
        self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._ema(sched["momentum"])
        return {"loss": sum(values.values()), **values,
                **{k: v for k, v in sched.items() if k != "last_layer_frozen"}, "grad_norm": grad_norm, **monitors}

    def _guard(self, terms: dict[str, torch.Tensor], monitors: dict[str, float], step: int) -> dict[str, float]:
        """Global-batch mean of each term (over ranks); stop before any update when one is not finite on any
        rank, naming the step and the term (the last checkpoint stays intact)."""
        vals = torch.stack([v.detach().float() for v in terms.values()])
        if self.env.is_distributed:
            import torch.distributed as tdist

            tdist.all_reduce(vals)
            vals /= self.env.world_size
        values = dict(zip(terms, vals.tolist()))
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            last = ck.latest_checkpoint(self.out)
            mon = ", ".join(f"{k} {v:.4g}" for k, v in monitors.items())
            raise GpfmError(f"step {step}: loss term '{bad[0]}' is not finite ({values[bad[0]]}); stopped before "
                            f"the update ({mon}); last checkpoint {last or 'none'} is intact; lower optim.base_lr, "
                            "use bf16 instead of fp16, or check the data for duplicates")
        return values

    def _clip(self) -> float:
        """Clip each student sub-module's gradient norm separately (DINOv2/GPFM); return the total norm."""
        s = self.student
        parts = [s.backbone, s.dino_head, s.ibot_head, *s.projectors.values(), *s.patch_projectors.values()]
        sq = 0.0
        clip = self.cfg.optim.clip_grad
        for m in parts:
            if m is None:
                continue
            params = [p for p in m.parameters() if p.grad is not None]
            if params:
                n = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
                sq += float(n.full_tensor() if hasattr(n, "full_tensor") else n) ** 2
        return math.sqrt(sq)

    @torch.no_grad()
    def _ema(self, m: float) -> None:
        sp = dict(self.student.named_parameters())
        tp = [p for _, p in self.teacher.named_parameters()]
        src = [sp[n] for n, _ in self.teacher.named_parameters()]
        torch._foreach_mul_(tp, m)
        torch._foreach_add_(tp, [p.detach() for p in src], alpha=1.0 - m)

    # -------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        end = min(cfg.run.steps, cfg.run.stop_after or cfg.run.steps)
        if self.start_step >= end:
            log.info("pretrain: nothing to do (at step %d of %d)", self.start_step, end)
            return {"step": self.start_step, "metrics": []}
        source = self.source if self.source is not None else make_source(cfg.data)
        loader = make_loader(source, cfg.data, cfg.crops, cfg.run.seed, self.start_step, end, env.rank,
                             env.world_size, self.grid, cfg.masking if self.use_ibot else None,
                             self.expert_sizes(), cfg.distill.colour, pin_memory=self.device.type == "cuda")
        metrics_path = self.out / "metrics.jsonl"
        skipped_path = self.out / ("skipped_tiles.jsonl" if env.is_main else f"skipped_tiles.rank{env.rank}.jsonl")
        self.student.train()
        self.teacher.train()
        bar = progress(total=end - self.start_step, desc="pretrain", quiet=self.quiet or not env.is_main,
                       unit="step")
        rows, last_t, state = [], time.perf_counter(), {}
        for step, batch in enumerate(loader, start=self.start_step):
            if batch["step"] != step:
                raise RuntimeError(f"data stream out of order: got step {batch['step']}, expected {step}")
            row = self.train_step(batch, step)
            now = time.perf_counter()
            row.update(step=step, images_per_s=cfg.data.batch_size / max(now - last_t, 1e-9),
                       skipped=len(batch["skipped"]))
            last_t = now
            rows.append(row)
            for desc, reason in batch["skipped"]:  # every rank logs its own skips
                append_jsonl(skipped_path, {"step": step, "rank": env.rank, "tile": desc, "reason": reason})
            if env.is_main:
                if step % cfg.run.log_every == 0 or step == end - 1:
                    append_jsonl(metrics_path, row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}")
            done = step + 1
            if done % cfg.run.ckpt_every == 0 or done == end:
                state = self.save(done)
        bar.close()
        if env.is_main and state and end == cfg.run.steps and cfg.run.export_at_end:
            from gpfm.pretrain.export import export_teacher

            export_teacher({**state, "step": end, "path": str(ck.latest_checkpoint(self.out))}, self.out / "export")
        dist.barrier()
        return {"step": end, "metrics": rows}

    def save(self, step: int) -> dict[str, Any]:
        state = self.state(step)  # every rank takes part (FSDP gathers to rank 0)
        if self.env.is_main:
            ck.save_checkpoint(self.out, step, state, self.cfg.run.keep_ckpts)
        dist.barrier()
        return state


def _record_run(cfg: PretrainConfig, out_dir: Path, resumed_step: int) -> None:
    """Write config.yaml and drop metrics rows past the checkpoint resumed from (they will be redone)."""
    save_config(cfg, out_dir / "config.yaml")
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file():
        keep = [r for r in read_jsonl(metrics) if r["step"] < resumed_step]
        write_text(metrics, "".join(json.dumps(r) + "\n" for r in keep))


def train(cfg: PretrainConfig, out_dir: str | Path, source: TileSource | TileStream | None = None,
          expert_factory=None, quiet: bool = False) -> dict[str, Any]:
    """Train, or resume from the latest checkpoint in `out_dir`. Returns {"step", "metrics": this process's
    rows}."""
    out_dir = Path(out_dir)
    trainer = Trainer(cfg, out_dir, source, expert_factory, quiet)
    ckpt_path = ck.latest_checkpoint(out_dir)
    if ckpt_path is not None:
        trainer.load(ck.load_checkpoint(ckpt_path))  # checks the config first
        log.info("pretrain: resumed from %s (step %d)", ckpt_path, trainer.start_step)
    if trainer.env.is_main:
        _record_run(cfg, out_dir, trainer.start_step)
    dist.barrier()
    return trainer.fit()


def run_command(args: Any) -> int:
    """`gpfm pretrain run CONFIG [key=value ...] --out DIR`."""
    cfg = load_config(PretrainConfig, args.config, list(args.overrides or []))
    if not torch.cuda.is_available() and cfg.data.num_workers > 0:  # CPU: leave the data workers their cores
        torch.set_num_threads(max(1, torch.get_num_threads() - cfg.data.num_workers))
    result = train(cfg, args.out, quiet=args.quiet)
    if dist.env().is_main:
        print(f"pretrain: at step {result['step']} of {cfg.run.steps}; run folder {args.out}")
    dist.destroy_process_group()
    return 0
