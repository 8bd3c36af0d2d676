"""The patch trainer on the engine's loop: any registered step rule (AdamW by default), warm-up + schedule,
accumulation, validation, best checkpoint, resume after interruption, a progress bar and a JSONL metrics log.

Run directory layout:
  metrics.jsonl             one JSON object per log/eval event
  checkpoints/last/         patch/ (the patch so far), optimizer.{safetensors,json} (the step rule's state_dict
                            and the RNG state), state.json (step, best, spec)
  checkpoints/best/         the best patch by validation metric
  patch/                    the final patch (best if validated, else last)
A killed run resumes from checkpoints/last and loses at most `save_every` steps.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from patchlm.data.features import build_features, collate, objective_for, pad_id
from patchlm.errors import OutputExistsError, PatchlmError
from patchlm.models.parts import model_device
from patchlm.patch import Patch, get_kind, provenance
from patchlm.paths import atomic_dir, strict_json
from patchlm.train.checkpoint import load_state, save_state
from patchlm.train.config import TrainConfig
from patchlm.train.distributed import DataParallel
from patchlm.train.engine import StepInfo, StopRequest, autocast, causal_lm_loss, to_device, train_loop
from patchlm.train.optim import StepRule, make_optimizer


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
        self.pad_id = pad_id(tok)
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
            if self.resume:
                self._check_resumable(json.loads((last / "state.json").read_text()))
        self.dp = DataParallel()  # torchrun / accelerate launch: shard batches, all-reduce, rank 0 writes
        self.dp.place(base.model)  # each rank on its own GPU (LOCAL_RANK); nothing moves on CPU
        self.device = model_device(base.model)
        self.writes = self.out is not None and self.dp.main
        if not self.dp.main:
            self.log = lambda msg: None  # one process speaks for the run

    def _request(self) -> dict:
        """What this run was asked to train: resuming must ask for the same (checked before anything is written)."""
        return {"kind": self.kind_name, "task": self.task.name, "fingerprint": self.base.fingerprint,
                "spec": {k: v for k, v in self.spec.items() if k != "seed"}, "seed": self.cfg.seed,
                "optimizer": self.cfg.optimizer, "objective": self.objective}

    def _check_resumable(self, state: dict) -> None:
        saved = state.get("request")
        if saved is None:
            return  # a checkpoint of an older patchlm: nothing recorded to compare with
        mine = self._request()
        names = {"kind": "method", "task": "task", "fingerprint": "base model (weight fingerprint)", "spec": "spec",
                 "seed": "seed", "optimizer": "optimizer", "objective": "objective"}
        for key, what in names.items():
            if key in saved and saved[key] != mine[key]:
                if key == "spec":
                    diff = sorted(k for k in set(saved[key]) | set(mine[key])
                                  if saved[key].get(k) != mine[key].get(k))
                    what = f"spec ({', '.join(diff)})"
                from patchlm.errors import ConfigError

                raise ConfigError(f"cannot resume the run in {self.out}: it was started with another {what} "
                                  f"({saved[key]!r}, now {mine[key]!r}); use the same settings, or --force to "
                                  "start over", field=key if key in ("seed", "optimizer", "objective") else None)

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
        with torch.no_grad(), autocast(self.device, self.cfg.bf16):
            for s in range(0, len(self.val_feats), self.cfg.batch_size):
                b = to_device(collate(self.val_feats[s: s + self.cfg.batch_size], self.pad_id), self.device)
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
        return Patch(kind=self.kind.saves_as or self.kind_name, base=self.base.ref(), spec=self.spec,
                     tensors=self.kind.state(self.base.model),
                     provenance=provenance(task=self.task.name, objective=self.objective, seed=self.cfg.seed,
                                           train=self.cfg.to_dict()),
                     metrics=metrics)

    def _save_last(self, step: int, rule: StepRule, best: dict) -> None:
        with atomic_dir(self.out / "checkpoints" / "last", force=True) as tmp:
            self._patch({"step": step}).save(tmp / "patch")
            save_state(tmp, "optimizer", {"optimizer": rule.state_dict(), "rng": torch.get_rng_state(),
                                          "name": self.cfg.optimizer})
            exact = self.kind.exact_state(self.base.model)
            if exact is not None:
                save_state(tmp, "weights", exact)
            state = {"step": step, "best": best, "spec": self.spec, "forward_passes": self._acc["forwards"],
                     "request": self._requested}
            (tmp / "state.json").write_text(strict_json(state, f"{self.out}/checkpoints/last/state.json"))

    def _load_last(self, rule: StepRule) -> tuple[int, dict]:
        last = self.out / "checkpoints" / "last"
        state = json.loads((last / "state.json").read_text())
        saved = load_state(last, "optimizer")
        if saved.get("name", "adamw") != self.cfg.optimizer:
            from patchlm.errors import ConfigError

            raise ConfigError(f"the run in {self.out} was trained with optimizer {saved.get('name')!r}, not "
                              f"{self.cfg.optimizer!r}: resume with the same optimizer or start over with --force")
        rule.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        if (last / "weights.json").exists():
            self.kind.load_exact_state(self.base.model, load_state(last, "weights"))
        self._resumed_forwards = int(state.get("forward_passes", 0))
        return int(state["step"]), state.get("best", {})

    # -- the loop
    def run(self) -> Patch:
        cfg, model = self.cfg, self.base.model
        self._requested = self._request()  # before attach resolves the spec
        self.dp.barrier()  # every rank has checked the output dir before rank 0 touches it
        torch.manual_seed(cfg.seed)
        resume_tensors = None
        if self.resume:
            resume_dir = self.out / "checkpoints" / "last"
            saved = json.loads((resume_dir / "state.json").read_text())
            self.spec = saved.get("spec", self.spec)
            resume_tensors = Patch.load(resume_dir / "patch").tensors
        elif self.writes and self.out.exists() and self.force:
            import shutil

            shutil.rmtree(self.out)
        self.spec = self.kind.attach(model, self.spec,
                                     resume_tensors if resume_tensors is not None else self.init_tensors,
                                     seed=self.spec["seed"]) or self.spec
        self.params = self.kind.trainable_parameters(model)
        if not self.params:
            raise PatchlmError(f"a {self.kind_name} patch has no trainable parameters")
        rule = self.dp.rule(make_optimizer(cfg.optimizer, self.params, cfg, model=model))
        self._resumed_forwards = 0
        step, best = 0, {}
        if self.writes:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.resume:
            step, best = self._load_last(rule)
            self.log(f"resuming from step {step}")
        def emit(rec: dict) -> None:
            if self.writes:  # one append per record: a killed run's log ends with its last full line
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(strict_json(rec, f"{self.out / 'metrics.jsonl'}") + "\n")

        t_start = time.perf_counter()
        acc = {"tokens": 0, "train_time": 0.0, "loss": 0.0, "n": 0, "best_tensors": None, "best": best,
               "forwards": self._resumed_forwards}
        self._acc = acc

        def batches(step: int) -> list[dict]:
            return self.dp.shard([collate(self._batch(step * cfg.grad_accum + j), self.pad_id)
                                  for j in range(cfg.grad_accum)])

        def on_step(info: StepInfo) -> None:
            step = info.step
            if self.dp.enabled:  # the whole global batch's counts, not this rank's share
                info.labels, info.tokens = self.dp.step_labels, self.dp.step_tokens
            acc["loss"] += info.loss * info.labels
            acc["n"] += info.labels
            acc["tokens"] += info.tokens
            acc["train_time"] += info.seconds
            acc["forwards"] += info.forwards
            if step % cfg.log_every == 0 or step == cfg.steps:
                emit({"step": step, "loss": acc["loss"] / max(1, acc["n"]), "lr": lr_at(step - 1, cfg),
                      "tokens_per_s": acc["tokens"] / max(acc["train_time"], 1e-9),
                      "forward_passes": acc["forwards"], "elapsed_s": time.perf_counter() - t_start,
                      **rule.metrics()})
                acc["loss"], acc["n"] = 0.0, 0
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                m = self.validate()
                if m:
                    emit({"step": step, **m})
                    sc = self._score(m)
                    if not acc["best"] or sc > acc["best"]["score"]:
                        acc["best"] = {"score": sc, "step": step, **m}
                        if self.writes:
                            self._patch({**m, "step": step}).save(self.out / "checkpoints" / "best", force=True)
                        else:
                            # a copy: a kind's state() may hand out the live parameters themselves
                            acc["best_tensors"] = {k: v.clone() for k, v in self.kind.state(model).items()}
                    model.train()
            if self.writes and (step % cfg.save_every == 0 or step == cfg.steps):
                self._save_last(step, rule, acc["best"])

        with StopRequest() as stop:
            step = train_loop(model, rule, batches, cfg.steps, start=step, loss_fn=causal_lm_loss, bf16=cfg.bf16,
                              lr_at=lambda s: lr_at(s, cfg), on_step=on_step, progress=cfg.progress and self.dp.main,
                              desc=f"train {self.kind_name}", stop=stop)
        if step < cfg.steps:  # stopped by Ctrl-C / SIGTERM at a step boundary: checkpoint, then say how to resume
            from patchlm.errors import TrainingInterrupted

            where = "nothing was written (no --out)"
            if self.out is not None:
                if self.writes:
                    self._save_last(step, rule, acc["best"])
                where = (f"checkpoint at step {step} of {cfg.steps} in {self.out}; the same command with --resume "
                         "continues")
            raise TrainingInterrupted(f"training interrupted: {where}", exit_code=stop.exit_code)
        best, best_tensors = acc["best"], acc["best_tensors"]
        tokens_total, train_time = acc["tokens"], acc["train_time"]
        model.eval()
        metrics = {"steps": step, "train_tokens_per_s": tokens_total / max(train_time, 1e-9),
                   "train_seconds": train_time, "forward_passes": acc["forwards"], **rule.metrics()}
        if best:
            metrics.update({k: v for k, v in best.items() if k != "score"})
            metrics["best_step"] = best["step"]
            tensors = Patch.load(self.out / "checkpoints" / "best").tensors if self.writes else best_tensors
            if best["step"] != step:  # load the best weights back into the live model
                self.kind.detach(model)
                self.kind.attach(model, self.spec, tensors, seed=self.spec["seed"])
        patch = self._patch(metrics)
        if self.writes:
            patch.save(self.out / "patch", force=True)
        self.dp.barrier()  # the other ranks return once rank 0 has written the patch
        return patch


def train_patch(base, task, method: str = "lora", spec: dict | None = None, config: TrainConfig | None = None,
                out: str | Path | None = None, resume: bool = False, force: bool = False) -> Patch:
    """Train a patch of kind `method` on `base` for `task`; the patched model stays attached to base.model."""
    return Trainer(base, method, spec or {}, task, config, out_dir=out, resume=resume, force=force).run()
