"""Model-GLUE's mixtures of merged families (Llama-family bases): model-, block- and FFN-level.

- model: the first `prefix_layers` layers of the merged dense model (the mean of the families) pool each
  sequence's hidden states; a router on that vector sends the whole sequence to one family's model.
- block: one router per block, on the mean-pooled hidden state entering it, picks the family whose decoder layer
  runs for that sequence; embeddings, final norm and head come from the merged dense model.
- ffn: the families' MLPs become the experts of an upcycled Mixtral (upcycle.py, gate mode `hidden`).

Routers of the model and block mixtures start from hidden states: each family's prompts give a prototype
(the masked mean of the pooled states, averaged over prompts); a router row is the family's prototype minus the
families' mean, L2-normalised (centring removes what every family shares, which would otherwise decide the
argmax). Routing is hard (top-1 per sequence); router-only training uses a straight-through estimator: the forward
value is the chosen family's output, the gradient flows through the softmax of the router logits.
Sequences are routed as a whole, so a decode step re-runs the routed forward without a KV cache (`generate` of
the model mixture routes once and decodes with the chosen family's cache).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from patchlm.errors import ConfigError
from patchlm.moe.upcycle import _linear_names, check_family, checkpoint_weights, patch_weights
from patchlm.patch import Patch


# ---------------------------------------------------------------- dense family models
def family_linears(base, sources: Sequence[Patch | str]) -> list[dict[str, torch.Tensor]]:
    """Every Linear weight (head excluded) of each family: a patch materialized on the base, or a checkpoint."""
    from patchlm.models.checkpoint import Checkpoint

    names = [n for n in _linear_names(base.model) if n != "lm_head"]
    base_cfg = Checkpoint(base.path or base.name).config
    check_family(base_cfg, f"the base {base.name}")
    out = []
    for s in sources:
        if isinstance(s, Patch):
            out.append(patch_weights(s, base, names))
        else:
            got = checkpoint_weights(str(s), base, base_cfg, [f"{n}.weight" for n in names])
            out.append({n[: -len(".weight")]: t for n, t in got.items()})
    return out


def dense_model(base, linears: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the base model with the given Linear weights."""
    m = copy.deepcopy(base.model)
    with torch.no_grad():
        for n, t in linears.items():
            m.get_submodule(n).weight.copy_(t)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def mean_linears(ws: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {n: torch.stack([w[n] for w in ws]).mean(0) for n in ws[0]}


# ---------------------------------------------------------------- pooling and router init
def masked_mean(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, h]: the mean over real (mask 1) positions of [B, T, h]."""
    if mask is None:
        return h.mean(1)
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


def _batches(tokenizer, prompts: Sequence[str], max_length: int, batch_size: int = 8):
    from patchlm.data.features import collate, pad_id

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_length:] for p in prompts]
    for i, (p, x) in enumerate(zip(prompts, ids)):
        if not x:
            raise ConfigError(f"prompt {i} ({p!r}) tokenizes to nothing")
    for s in range(0, len(ids), batch_size):
        yield collate([{"input_ids": x} for x in ids[s: s + batch_size]], pad_id(tokenizer), labels=False)


@torch.no_grad()
def pooled_states(model, tokenizer, prompts: Sequence[str], max_length: int) -> torch.Tensor:
    """[L + 1, h]: per hidden-state index (embeddings, then each layer's output), the masked mean over positions,
    averaged over prompts."""
    total, n = None, 0
    for b in _batches(tokenizer, prompts, max_length):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        pooled = torch.stack([masked_mean(h.float(), b["attention_mask"]) for h in out.hidden_states])  # [L+1,B,h]
        s = pooled.sum(1)
        total = s if total is None else total + s
        n += b["input_ids"].shape[0]
    return total / n


def centred_rows(protos: torch.Tensor) -> torch.Tensor:
    """[F, h] router rows from [F, h] prototypes: centred over families, L2-normalised."""
    c = protos - protos.mean(0, keepdim=True)
    return c / c.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _straight_through(logits: torch.Tensor) -> torch.Tensor:
    """[B, F] gates: one-hot of the argmax in value, softmax in gradient."""
    p = torch.softmax(logits.float(), -1)
    hard = torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).to(p.dtype)
    return hard + p - p.detach()


# ---------------------------------------------------------------- model-level
class ModelMixture(nn.Module):
    """A router on the pooled output of the merged model's first layers sends each sequence to one family."""

    def __init__(self, prefix: nn.Module, families: Sequence[nn.Module], hidden: int):
        super().__init__()
        self.prefix = prefix            # a decoder stack (the merged model's first layers, then its final norm)
        self.families = nn.ModuleList(families)
        self.router = nn.Linear(hidden, len(families), bias=False)
        self.config = families[0].config

    def route_logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        h = self.prefix(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.router(masked_mean(h.float(), attention_mask).to(self.router.weight.dtype))

    @torch.no_grad()
    def route(self, input_ids, attention_mask=None) -> torch.Tensor:
        return self.route_logits(input_ids, attention_mask).argmax(-1)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        logits = self.route_logits(input_ids, attention_mask)
        if self.training:
            g = _straight_through(logits)
            out = sum(g[:, f, None, None] * fam(input_ids=input_ids, attention_mask=attention_mask,
                                                  use_cache=False).logits.float()
                      for f, fam in enumerate(self.families))
            return CausalLMOutputWithPast(logits=out)
        choice = logits.argmax(-1)
        out = None
        for f in choice.unique().tolist():
            rows = (choice == f).nonzero().squeeze(-1)
            lg = self.families[f](input_ids=input_ids[rows], use_cache=False,
                                  attention_mask=None if attention_mask is None else attention_mask[rows]).logits
            if out is None:
                out = lg.new_zeros((input_ids.shape[0], *lg.shape[1:]))
            out[rows] = lg
        return CausalLMOutputWithPast(logits=out)

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.router.parameters())


def model_mixture(base, sources: Sequence[Patch | str], prompts: Sequence[Sequence[str]], prefix_layers: int,
                  max_length: int) -> ModelMixture:
    """The model-level mixture of families (patches or checkpoints), routers initialised from `prompts`."""
    ws = family_linears(base, sources)
    fams = [dense_model(base, w) for w in ws]
    merged = dense_model(base, mean_linears(ws))
    L = merged.config.num_hidden_layers
    if not 1 <= prefix_layers <= L:
        raise ConfigError(f"prefix_layers must be in 1..{L}, got {prefix_layers}", field="mix_layers")
    prefix = merged.model
    prefix.layers = prefix.layers[:prefix_layers]
    prefix.config = copy.deepcopy(prefix.config)
    prefix.config.num_hidden_layers = prefix_layers
    mix = ModelMixture(prefix, fams, merged.config.hidden_size)
    protos = torch.stack([_prefix_proto(prefix, base.tokenizer, p, max_length) for p in prompts])
    with torch.no_grad():
        mix.router.weight.copy_(centred_rows(protos))
    mix.eval()
    return mix


@torch.no_grad()
def _prefix_proto(prefix, tokenizer, prompts, max_length) -> torch.Tensor:
    total, n = None, 0
    for b in _batches(tokenizer, prompts, max_length):
        h = prefix(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        s = masked_mean(h.float(), b["attention_mask"]).sum(0)
        total = s if total is None else total + s
        n += b["input_ids"].shape[0]
    return total / n


# ---------------------------------------------------------------- block-level
class RoutedLayer(nn.Module):
    """One block position: the families' decoder layers and a router on the pooled input choosing one per sequence."""

    def __init__(self, layers: Sequence[nn.Module], hidden: int, masks: dict):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.router = nn.Linear(hidden, len(layers), bias=False)
        self._masks = masks  # the 2-D attention mask of the running forward (set by the backbone's pre-hook)

    def forward(self, hidden_states, **kwargs):
        kwargs["cache"], kwargs["use_cache"] = None, False  # sequences are routed as a whole: no KV cache
        kwargs.pop("past_key_values", None)
        mask = self._masks.get("mask")
        logits = self.router(masked_mean(hidden_states.float(), mask).to(self.router.weight.dtype))
        if self.training:
            g = _straight_through(logits).to(hidden_states.dtype)
            return sum(g[:, f, None, None] * layer(hidden_states, **kwargs) for f, layer in enumerate(self.layers))
        choice = logits.argmax(-1)
        B = hidden_states.shape[0]
        out = torch.empty_like(hidden_states)
        for f in choice.unique().tolist():
            rows = (choice == f).nonzero().squeeze(-1)
            kw = {k: _rows(v, rows, B) for k, v in kwargs.items()}
            out[rows] = self.layers[f](hidden_states[rows], **kw)
        return out


def _rows(v, rows, B):
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B and B > 1:
        return v[rows]
    if isinstance(v, tuple):
        return tuple(_rows(x, rows, B) for x in v)
    return v


def block_mixture(base, sources: Sequence[Patch | str], prompts: Sequence[Sequence[str]], max_length: int
                  ) -> nn.Module:
    """The block-level mixture: the merged model with each decoder layer replaced by a RoutedLayer."""
    ws = family_linears(base, sources)
    fams = [dense_model(base, w) for w in ws]
    merged = dense_model(base, mean_linears(ws))
    protos = torch.stack([pooled_states(merged, base.tokenizer, p, max_length) for p in prompts])  # [F, L+1, h]
    masks: dict = {}

    def capture(_module, args, kwargs):
        masks["mask"] = kwargs.get("attention_mask")

    merged.model.register_forward_pre_hook(capture, with_kwargs=True)
    h = merged.config.hidden_size
    for i in range(merged.config.num_hidden_layers):
        rl = RoutedLayer([f.model.layers[i] for f in fams], h, masks)
        with torch.no_grad():
            rl.router.weight.copy_(centred_rows(protos[:, i]))
        merged.model.layers[i] = rl
    merged.eval()
    return merged


def block_router_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, RoutedLayer) for p in m.router.parameters()]


def mixture_params(model: nn.Module, level: str) -> dict:
    """Total parameters (shared ones once) and those one token runs through."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    if level == "model":
        fam = sum(p.numel() for p in model.families[0].parameters())
        pre = sum(p.numel() for p in model.prefix.parameters()) + model.router.weight.numel()
        return {"total_params": total, "active_params": pre + fam}
    if level == "block":
        inactive = sum(sum(p.numel() for p in layer.parameters())
                       for m in model.modules() if isinstance(m, RoutedLayer) for layer in list(m.layers)[1:])
        return {"total_params": total, "active_params": total - inactive}
    raise ConfigError(f"unknown mixture level {level!r}; choices: model, block")


# ---------------------------------------------------------------- one entry point (patchlm glue --mix)
def mix(base, sources: Sequence[Patch | str], family_tasks: Sequence[Sequence[str]], level: str, *,
        config=None, prefix_layers: int = 2, router_steps: int = 0, log=None) -> tuple[nn.Module, dict]:
    """Mix merged families at `level`: (the mixture, a report of what was mixed, how routers started and trained).

    family_tasks: each family's members' training tasks (its router prompts and router-training data)."""
    from dataclasses import replace

    from patchlm.moe.config import MoeConfig
    from patchlm.moe.train import router_parameters, train_routers
    from patchlm.moe.upcycle import Expert, task_prompts, upcycle

    cfg = config or MoeConfig()
    log = log or (lambda _: None)
    if len(sources) < 2:
        raise ConfigError(f"mixing needs at least two families, got {len(sources)}: every member fell into one "
                          "family (raise threshold, e.g. 1.0, to keep members apart)", field="threshold")
    if any(not t for t in family_tasks):
        raise ConfigError("every family needs the training task of a member (its router prompts)")
    prompts = [[p for t in tasks for p in task_prompts(t, base.tokenizer, cfg.prompts_per_task, cfg.max_length)]
               for tasks in family_tasks]
    report = {"level": level, "families": len(sources), "router_init": "hidden states of each family's prompts",
              "prompts_per_family": [len(p) for p in prompts]}
    log(f"mix: {level}-level mixture of {len(sources)} families")
    if level == "ffn":
        experts = [Expert(source=str(getattr(s, "path", None) or f"family-{k}"), patch=s, positive_prompts=prompts[k])
                   if isinstance(s, Patch) else Expert(source=str(s), positive_prompts=prompts[k])
                   for k, s in enumerate(sources)]
        up = upcycle(base.name, experts, replace(cfg, gate_mode="hidden", top_k=min(cfg.top_k, len(sources))),
                     base=base)
        model, params = up.model, router_parameters(up.model)
        report.update({k: up.report[k] for k in ("total_params", "active_params", "top_k")})
        report["router_init"] = "mergekit-moe hidden: last-token layer inputs of each family's prompts"
    elif level == "model":
        model = model_mixture(base, sources, prompts, prefix_layers, cfg.max_length)
        params = model.router_parameters()
        report.update(mixture_params(model, "model"), prefix_layers=prefix_layers)
    elif level == "block":
        model = block_mixture(base, sources, prompts, cfg.max_length)
        params = block_router_parameters(model)
        report.update(mixture_params(model, "block"))
    else:
        raise ConfigError(f"unknown mix {level!r}; choices: model, block, ffn", field="mix")
    if router_steps:
        tasks = sorted({t for ts in family_tasks for t in ts})
        report["router_training"] = train_routers(model, base.tokenizer, tasks,
                                                  replace(cfg, router_steps=router_steps), params=params, log=log)
    model.eval()
    return model, report


def save_mixture(model: nn.Module, report: dict, out, force: bool = False) -> None:
    """An FFN-level mixture as a plain Mixtral checkpoint; a model- or block-level one as its routers
    (routers.safetensors) beside the report (the families are the merged patches the report names)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from patchlm.paths import atomic_dir

    if report["level"] == "ffn":
        from patchlm.moe.upcycle import write_mixtral

        write_mixtral(model, None, out, force=force,
                      extra={"mixture.json": json.dumps(report, indent=2, default=str) + "\n"})
        return
    routers = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "router" in n}
    with atomic_dir(Path(out), force=force) as tmp:
        save_file(routers, str(tmp / "routers.safetensors"))
        (tmp / "mixture.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
