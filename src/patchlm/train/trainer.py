"""The training loop for patches: AdamW, warm-up + schedule, accumulation, validation, best checkpoint,
resume after interruption, a progress bar and a JSONL metrics log.

Run directory layout:
  metrics.jsonl             one JSON object per log/eval event
  checkpoints/last/         patch/ (the patch so far), optimizer.safetensors, state.json (step, rng, best)
  checkpoints/best/         the best patch by validation metric
  patch/                    the final patch (best if validated, else last)
A killed run resumes from checkpoints/last and loses at most `save_every` steps.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from patchlm.errors import OutputExistsError, PatchlmError
from patchlm.patch import Patch, get_kind, provenance
from patchlm.paths import atomic_dir
from patchlm.train.config import TrainConfig
from patchlm.train.objectives import IGNORE, build_features, objective_for


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    warm = cfg.warmup_steps()
    if warm and step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warm) / max(1, cfg.steps - warm)
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def collate(feats: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(f["input_ids"]) for f in feats)
    ids = torch.full((len(feats), n), pad_id, dtype=torch.long)
    labels = torch.full((len(feats), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(feats), n), dtype=torch.long)
    for i, f in enumerate(feats):
        k = len(f["input_ids"])
        ids[i, :k] = torch.tensor(f["input_ids"])
        labels[i, :k] = torch.tensor(f["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labelled positions.

    The output head runs only on positions that carry a label (for classification a handful per example),
    which saves the memory and time of full-vocabulary logits everywhere.
    """
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    target = labels[:, 1:]
    keep = target != IGNORE
    n = int(keep.sum())
    if n == 0:
        raise PatchlmError("a training batch has no labelled tokens")
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or head is None or getattr(model.config, "final_logit_softcapping", None):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        return F.cross_entropy(logits[keep].float(), target[keep]), n
    hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    logits = head(hidden[keep])
    return F.cross_entropy(logits.float(), target[keep]), n


class Trainer:
    """Trains one patch of a given kind on a base model for a task; checkpoints and resumes."""

    def __init__(self, base, kind: str, spec: dict, task, config: TrainConfig | None = None,
                 out_dir: str | Path | None = None, resume: bool = False, force: bool = False,
                 init_tensors: dict | None = None, log=None):
        self.base, self.task, self.cfg = base, task, config or TrainConfig()
        self.kind_name, self.kind = kind, get_kind(kind)
        self.spec = dict(spec)
        self.spec.setdefault("seed", self.cfg.seed)
        self.out = Path(out_dir) if out_dir else None
        self.resume, self.force = resume, force
        self.init_tensors = init_tensors
        self.log = log or (lambda msg: None)
        self.objective = objective_for(task, self.cfg.objective)
        tok = base.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        # Build all inputs before any file is written: bad data fails here, leaving nothing behind.
        self.train_feats = build_features(task, "train", tok, self.objective, self.cfg.max_length)
        self.val_feats = None
        if self.objective != "classification" and task.split("validation"):
            self.val_feats = build_features(task, "validation", tok, self.objective, self.cfg.max_length,
                                            limit=self.cfg.eval_limit)
        if self.out is not None:
            last = self.out / "checkpoints" / "last"
            if self.out.exists() and not resume and not force and any(self.out.iterdir()):
                raise OutputExistsError(f"output {self.out} already exists; pass --force to start over "
                                        "or --resume to continue its run")
            if resume and not (last / "state.json").exists():
                self.resume = False  # nothing to resume: a fresh run
        self.device = next(base.model.parameters()).device

    # -- data order: deterministic per (seed, epoch), so a resumed run sees the same batches
    def _batch(self, micro_index: int) -> list[dict]:
        n, bs = len(self.train_feats), self.cfg.batch_size
        start = micro_index * bs
        out = []
        for k in range(start, start + bs):
            epoch, pos = divmod(k, n)
            if epoch != getattr(self, "_perm_epoch", None):
                self._perm = list(range(n))
                random.Random(self.cfg.seed * 100003 + epoch).shuffle(self._perm)
                self._perm_epoch = epoch
            out.append(self.train_feats[self._perm[pos]])
        return out

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.cfg.bf16 else nullcontext()

    # -- validation
    def validate(self) -> dict:
        model = self.base.model
        if self.objective == "classification":
            from patchlm.evaluate.classify import evaluate_classification

            if not self.task.split("validation"):
                return {}
            m = evaluate_classification(model, self.base.tokenizer, self.task, split="validation",
                                        limit=self.cfg.eval_limit, batch_size=max(8, self.cfg.batch_size),
                                        bf16=self.cfg.bf16, max_length=self.cfg.max_length)
            return {"val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"]}
        if not self.val_feats:
            return {}
        was = model.training
        model.eval()
        tot, cnt = 0.0, 0
        with torch.no_grad(), self._autocast():
            for s in range(0, len(self.val_feats), self.cfg.batch_size):
                b = {k: v.to(self.device) for k, v in collate(self.val_feats[s: s + self.cfg.batch_size], self.pad_id).items()}
                loss, n = causal_lm_loss(model, b)
                tot += loss.item() * n
                cnt += n
        model.train(was)
        return {"val_loss": tot / cnt, "val_perplexity": math.exp(min(50.0, tot / cnt))}

    @staticmethod
    def _score(m: dict) -> float | None:
        if "val_accuracy" in m:
            return m["val_accuracy"]
        if "val_loss" in m:
            return -m["val_loss"]
        return None

    # -- checkpoints
    def _patch(self, metrics: dict) -> Patch:
        return Patch(kind=self.kind_name, base=self.base.ref(), spec=self.spec, tensors=self.kind.state(self.base.model),
                     provenance=provenance(task=self.task.name, objective=self.objective, seed=self.cfg.seed,
                                           train=self.cfg.to_dict()),
                     metrics=metrics)

    def _save_last(self, step: int, opt, best: dict) -> None:
        from safetensors.torch import save_file

        with atomic_dir(self.out / "checkpoints" / "last", force=True) as tmp:
            self._patch({"step": step}).save(tmp / "patch")
            state = {}
            for i, p in enumerate(self.params):
                st = opt.state.get(p, {})
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in st:
                        state[f"{i}.{k}"] = st[k].detach().cpu().contiguous()
            state["rng"] = torch.get_rng_state()
            save_file(state, str(tmp / "optimizer.safetensors"))
            adam_step = [float(opt.state.get(p, {}).get("step", 0)) for p in self.params]
            (tmp / "state.json").write_text(json.dumps({"step": step, "best": best, "adam_step": adam_step,
                                                        "spec": self.spec}))

    def _load_last(self, opt) -> tuple[int, dict]:
        from safetensors.torch import load_file

        last = self.out / "checkpoints" / "last"
        state = json.loads((last / "state.json").read_text())
        tensors = load_file(str(last / "optimizer.safetensors"))
        for i, p in enumerate(self.params):
            if f"{i}.exp_avg" in tensors:
                opt.state[p] = {"step": torch.tensor(state["adam_step"][i]),
                                "exp_avg": tensors[f"{i}.exp_avg"].to(p.device),
                                "exp_avg_sq": tensors[f"{i}.exp_avg_sq"].to(p.device)}
        torch.set_rng_state(tensors["rng"])
        return int(state["step"]), state.get("best", {})

    # -- the loop
    def run(self) -> Patch:
        cfg, model = self.cfg, self.base.model
        torch.manual_seed(cfg.seed)
        resume_tensors = None
        if self.resume:
            resume_dir = self.out / "checkpoints" / "last"
            saved = json.loads((resume_dir / "state.json").read_text())
            self.spec = saved.get("spec", self.spec)
            resume_tensors = Patch.load(resume_dir / "patch").tensors
        elif self.out is not None and self.out.exists() and self.force:
            import shutil

            shutil.rmtree(self.out)
        self.kind.attach(model, self.spec, resume_tensors if resume_tensors is not None else self.init_tensors,
                         seed=self.spec["seed"])
        self.params = self.kind.trainable_parameters(model)
        if not self.params:
            raise PatchlmError(f"a {self.kind_name} patch has no trainable parameters")
        opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        step, best = 0, {}
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.resume:
            step, best = self._load_last(opt)
            self.log(f"resuming from step {step}")
        metrics_f = open(self.out / "metrics.jsonl", "a") if self.out is not None else None

        def emit(rec: dict) -> None:
            if metrics_f:
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()

        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=step, desc=f"train {self.kind_name}", unit="step", leave=False)
        model.train()
        t_start, tokens_total, loss_acc, n_acc = time.perf_counter(), 0, 0.0, 0
        train_time = 0.0
        best_tensors = None
        try:
            while step < cfg.steps:
                t0 = time.perf_counter()
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, cfg)
                micro = [collate(self._batch(step * cfg.grad_accum + j), self.pad_id) for j in range(cfg.grad_accum)]
                total_labels = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
                for b in micro:
                    b = {k: v.to(self.device) for k, v in b.items()}
                    with self._autocast():
                        loss, n = causal_lm_loss(model, b)
                    (loss * n / total_labels).backward()
                    loss_acc += loss.item() * n
                    n_acc += n
                    tokens_total += int(b["attention_mask"].sum())
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                train_time += time.perf_counter() - t0
                if bar:
                    bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    rec = {"step": step, "loss": loss_acc / max(1, n_acc), "lr": lr_at(step - 1, cfg),
                           "tokens_per_s": tokens_total / max(train_time, 1e-9), "elapsed_s": time.perf_counter() - t_start}
                    emit(rec)
                    if bar:
                        bar.set_postfix(loss=f"{rec['loss']:.3f}")
                    loss_acc, n_acc = 0.0, 0
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                    m = self.validate()
                    if m:
                        emit({"step": step, **m})
                        sc = self._score(m)
                        if not best or sc > best["score"]:
                            best = {"score": sc, "step": step, **m}
                            if self.out is not None:
                                self._patch({**m, "step": step}).save(self.out / "checkpoints" / "best", force=True)
                            else:
                                best_tensors = self.kind.state(model)
                        model.train()
                if self.out is not None and (step % cfg.save_every == 0 or step == cfg.steps):
                    self._save_last(step, opt, best)
        finally:
            if bar:
                bar.close()
            if metrics_f:
                metrics_f.close()
        model.eval()
        metrics = {"steps": step, "train_tokens_per_s": tokens_total / max(train_time, 1e-9),
                   "train_seconds": train_time}
        if best:
            metrics.update({k: v for k, v in best.items() if k != "score"})
            metrics["best_step"] = best["step"]
            if self.out is not None:
                tensors = Patch.load(self.out / "checkpoints" / "best").tensors
            else:
                tensors = best_tensors
            if best["step"] != step:  # load the best weights back into the live model
                self.kind.detach(model)
                self.kind.attach(model, self.spec, tensors, seed=self.spec["seed"])
        patch = self._patch(metrics)
        if self.out is not None:
            patch.save(self.out / "patch", force=True)
        return patch


def train_patch(base, task, method: str = "lora", spec: dict | None = None, config: TrainConfig | None = None,
                out: str | Path | None = None, resume: bool = False, force: bool = False) -> Patch:
    """Train a patch of kind `method` on `base` for `task`; the patched model stays attached to base.model."""
    return Trainer(base, method, spec or {}, task, config, out_dir=out, resume=resume, force=force).run()
