"""The lm-evaluation-harness model `patchlm`: a base with a stack of patches behind the harness's `LM` API.

    lm_eval --model patchlm --model_args base=smollm2-135m,patches=runs/a/patch+runs/drop2 --tasks ...

Patches are applied as `patchlm eval` applies them (weight patches first, then depth patches, each stage in the
given order). Log-likelihoods are scored exactly as patchlm's classifier scores labels: the context and the
continuation are tokenized separately without special tokens and concatenated, so a task exported by
`patchlm data export-harness` gets the accuracy `patchlm eval` reports. Needs the `harness` extra (lm-eval).

`lm_eval` finds the model once the import hook is installed (`python -m patchlm.evaluate.harness --install-hook`,
done by `make setup`); `python -m patchlm.evaluate.harness ARGS...` runs the lm_eval CLI with it registered.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from patchlm.data.features import collate, pad_id
from patchlm.errors import ConfigError
from patchlm.evaluate.config import EvalConfig
from patchlm.models.parts import autocast, model_device

HOOK_NAME = "patchlm-lm-eval.pth"
TARGET = "patchlm.evaluate.harness:PatchlmLM"


def _truthy(v) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "on")


@register_model("patchlm")
class PatchlmLM(LM):
    """base: a built-in name, checkpoint dir or .gguf; patches: patch dirs joined by '+' (or a list).

    batch_size, max_length and bf16 default to `patchlm eval`'s (EvalConfig), so prompts are cut alike."""

    def __init__(self, base: str | None = None, patches: str | list | None = None,
                 batch_size: int | str = EvalConfig.batch_size, max_length: int = EvalConfig.max_length,
                 max_gen_toks: int = 256, bf16: bool | str = EvalConfig.bf16, force: bool | str = False,
                 device: str | None = None, model=None, tokenizer=None, **kwargs):
        super().__init__()
        from patchlm.patch import Patch, stack_order

        if model is None:
            if not base:
                raise ConfigError("the patchlm harness model needs base=NAME (a built-in model, checkpoint dir or "
                                  ".gguf) in --model_args")
            from patchlm.models import load_base

            names = [p for p in (patches.split("+") if isinstance(patches, str) else patches or []) if str(p).strip()]
            loaded = [Patch.load(Path(str(p).strip())) for p in names]  # every patch read before the model loads
            b = load_base(str(base))
            for p in stack_order(loaded):
                p.apply(b, force=_truthy(force))
            model, tokenizer = b.model, b.tokenizer
        if device and not (str(device).startswith("cuda") and not torch.cuda.is_available()):
            model.to(device)  # lm_eval passes its --device default (cuda) even on a CPU-only machine: ignored then
        self.model, self.tokenizer = model.eval(), tokenizer
        self._device = model_device(model)
        try:
            self.batch_size = max(1, int(batch_size))
        except (TypeError, ValueError):  # "auto" and friends: a fixed size is all we do
            self.batch_size = EvalConfig.batch_size
        self.max_length, self.max_gen_toks, self.bf16 = int(max_length), int(max_gen_toks), _truthy(bf16)
        self.pad = pad_id(tokenizer)
        eot = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        self.eot = int(eot if eot is not None else self.pad)

    # ------------------------------------------------------------------ helpers
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), whether greedy decoding gives it) for token-id pairs, batched."""
        seqs = []
        for ctx, cont in pairs:
            ctx = ctx or [self.eot]
            keep = max(1, self.max_length - len(cont))
            seqs.append((ctx[-keep:], cont))
        out: list[tuple[float, bool] | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -(len(seqs[i][0]) + len(seqs[i][1])))
        for s in range(0, len(order), self.batch_size):
            idx = order[s: s + self.batch_size]
            b = collate([{"input_ids": seqs[i][0] + seqs[i][1]} for i in idx], self.pad, labels=False)
            ids, mask = b["input_ids"].to(self._device), b["attention_mask"].to(self._device)
            with autocast(self._device, self.bf16):
                logits = self.model(input_ids=ids, attention_mask=mask).logits
            for row, i in enumerate(idx):
                ctx, cont = seqs[i]
                pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont), device=self._device)
                lp = torch.log_softmax(logits[row, pos].float(), -1)
                target = torch.tensor(cont, device=self._device)
                out[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ the LM API
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._score([(self._encode(r.args[0]), self._encode(r.args[1])) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of whole strings in disjoint windows of max_length tokens (the first after EOS)."""
        out = []
        for r in requests:
            full = [self.eot, *self._encode(r.args[0])]
            pairs = [(full[s: s + 1], full[s + 1: s + self.max_length]) for s in range(0, len(full) - 1,
                                                                                       self.max_length - 1)]
            out.append(sum(ll for ll, _ in self._score([p for p in pairs if p[1]])))
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """Greedy decoding, cut at the first stop string (gen_kwargs: until, max_gen_toks)."""
        out = []
        for r in requests:
            context, kw = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kw.get("max_gen_toks", self.max_gen_toks))
            ids = (self._encode(context) or [self.eot])[-max(1, self.max_length - n):]
            x = torch.tensor([ids], device=self._device)
            with autocast(self._device, self.bf16):
                gen = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                          do_sample=False, pad_token_id=self.pad)
            text = self.tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def hook_source() -> str:
    """The one line of the .pth file: when `lm_eval.models` is imported (as `lm_eval` does to find a model),
    register `patchlm` as a lazy entry (patchlm itself loads only if the model is asked for)."""
    code = (
        "import importlib.abc, importlib.machinery, sys\n"
        "class _PatchlmLmEval(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name != 'lm_eval.models':\n"
        "            return None\n"
        "        spec = importlib.machinery.PathFinder.find_spec(name, path)\n"
        "        if spec is None or spec.loader is None:\n"
        "            return spec\n"
        "        run = spec.loader.exec_module\n"
        "        def exec_module(module, run=run):\n"
        "            run(module)\n"
        "            from lm_eval.api.registry import model_registry\n"
        "            if 'patchlm' not in model_registry:\n"
        f"                model_registry.register('patchlm', target={TARGET!r})\n"
        "        spec.loader.exec_module = exec_module\n"
        "        return spec\n"
        "sys.meta_path.insert(0, _PatchlmLmEval())\n"
    )
    return f"import sys; exec({code!r}, {{'__name__': 'patchlm_lm_eval_hook'}})\n"


def install_hook(site_dir: str | Path | None = None) -> Path:
    """Write the .pth hook into site-packages (default: this interpreter's purelib)."""
    import sysconfig

    from patchlm.paths import atomic_write_text

    path = Path(site_dir or sysconfig.get_paths()["purelib"]) / HOOK_NAME
    atomic_write_text(path, hook_source(), mode=0o644)
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m patchlm.evaluate.harness --install-hook`, or ARGS... run as the lm_eval CLI with patchlm."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--install-hook"]:
        print(f"wrote {install_hook(argv[1] if len(argv) > 1 else None)}")
        return
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
