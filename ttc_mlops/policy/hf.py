"""The transformers policy backend: batched sampling with per-request seeds and stop strings.

    python -c "from ttc_mlops.config import Recipe; from ttc_mlops.policy.hf import HFPolicy; \
from ttc_mlops.policy import Sampling; p = HFPolicy(Recipe(model_path='embedded:SmolLM2-135M-Instruct').policy_settings); \
print(p.generate([p.chat_prompt('', 'What is 2+3?')], Sampling(max_tokens=32), [0]))"

`model.generate` samples a batch from one random stream, so a row's sample would depend on the
rows beside it. This backend runs its own decoding loop instead: one KV-cached forward pass per
token for the whole batch, then each row draws from its own `torch.Generator` seeded per request.
Finished rows leave the batch at once (the last rows move into their cache slots), which is what
makes step-level search cheap: most beams stop at the step delimiter long before `max_tokens`.
Prompts and the rows that stopped at a step are kept in a `PrefixStore` (`prefix_cache_gib`): the
next iteration's prompt is one of them plus its step, so only the step's last tokens run again.
On a CPU, decoding steps attend over a cache that holds each distinct prompt once however many
requests sample from it (`kvcache.share_prompts`), through batched matmuls instead of sdpa; with
`continuous` (the default), `stream()` feeds that loop continuously: requests join the running batch
as rows leave it, and come back as soon as they finish, each sampling what it would alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..config import PolicySettings
from . import Generation, Sampling, chat_prompt, check_seeds

log = logging.getLogger(__name__)

MAX_BATCH = 64  # rows per decoding loop; bounds the KV cache on small machines


class HFPolicy:
    def __init__(self, settings: PolicySettings, max_batch: int = MAX_BATCH):
        from ..models import compute_params, load_causal_lm
        from .kvcache import cache_kwarg, store_for, use_decode_attention

        self.name = settings.path
        self.model, self.tokenizer, self.device = load_causal_lm(settings)
        if settings.chat_template is not None:
            self.tokenizer.chat_template = settings.chat_template
        self.max_batch = max_batch
        self.progress = None  # called with the tokens each decoding step sampled
        self.params = compute_params(self.model)
        self.prompt_tokens = 0  # prompt tokens run through the model (prefix reuse spares the rest)
        self.prompt_tokens_full = 0  # every prompt token of every request
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.eos_ids = set(eos) | ({self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        # A prompt of the next iteration is a prompt of this one plus a sampled step: keep both.
        self.store = store_for(self.model, settings.prefix_cache_gib, f"policy {self.name}")
        # decoding steps attend over caches that hold each prompt once (CPU, sdpa models)
        self.shared_prompts = use_decode_attention(self.model)
        self.cache_kw = cache_kwarg(self.model)  # the name the model's forward takes its cache by

    def clear_cache(self) -> None:
        if self.store is not None:
            self.store.clear()

    def chat_prompt(self, system: str, user: str) -> str:
        return chat_prompt(self.tokenizer, system, user)

    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[Generation]:
        requests = self._requests(prompts, sampling, seeds)
        # Similar lengths together: less padding. Results go back in the caller's order.
        order = sorted(requests, key=lambda r: len(r.prompt))
        for start in range(0, len(order), self.max_batch):
            batch = _Batch(self)
            batch.admit(order[start : start + self.max_batch])
            while batch.rows:
                batch.step()
        return [self._finish(r.tokens, r.finish, sampling) for r in requests]

    # On a CPU a step-level search feeds the decoding batch continuously (`stream`); False runs it in
    # lockstep waves, one `generate` call per iteration (docs/benchmarks.md, "Continuous feeding on
    # the transformers backend", compares the two). The records are the same either way in float32.
    continuous = True

    def __getattr__(self, name: str):
        """`stream` exists only with `continuous` on a CPU (shared-prompt caches): requests then
        join the running decoding batch as rows leave it (`HFStream`). Without it a policy is not
        `Streaming`, and a search runs in waves of `generate` calls (`open_stream`), metered as such."""
        if name == "stream" and self.continuous and self.__dict__.get("shared_prompts"):
            return lambda: HFStream(self)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}"
                             + (" (continuous=True, on a CPU, gives a continuous stream)" if name == "stream" else ""))

    def _requests(self, prompts: list[str], sampling: Sampling, seeds: list[int], first: int = 0) -> list[_Request]:
        """Requests with tickets from `first` on, each drawing from its own stream seeded with its seed."""
        import torch

        check_seeds(prompts, seeds)
        return [_Request(first + i, p, sampling, torch.Generator(device=self.device).manual_seed(int(s) % (2**63)))
                for i, (p, s) in enumerate(zip(prompts, seeds))]

    def _finished(self, ids: list[int], sampling: Sampling) -> str | None:
        if ids[-1] in self.eos_ids:
            return "eos"
        if sampling.stop and self._hit_stop(ids, sampling.stop):
            return "stop"
        if len(ids) >= sampling.max_tokens:
            return "length"
        return None

    @staticmethod
    def _sample(logits, sampling: Sampling, generators: list) -> list[int]:
        import torch

        if sampling.temperature == 0:
            return logits.argmax(-1).tolist()
        probs = torch.softmax(logits / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
            # keep the smallest set whose mass reaches top_p (the first token always stays)
            drop = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)
        # One uniform draw per row from the row's own stream, so a row's sample ignores its
        # neighbours, turned into a token through the row's CDF: one batched search, where
        # `torch.multinomial` per row draws an exponential for every token of the vocabulary.
        u = torch.tensor([float(torch.rand((), generator=g, device=probs.device)) for g in generators],
                         dtype=torch.float64, device=probs.device)
        cdf = probs.double().cumsum(-1)
        picks = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        return picks.clamp(max=probs.shape[-1] - 1).tolist()

    def _hit_stop(self, ids: list[int], stop: tuple[str, ...]) -> bool:
        # Only the tail can hold a new stop string; a few tokens cover any delimiter.
        tail = self.tokenizer.decode(ids[-8:], skip_special_tokens=True)
        return any(s in tail for s in stop)

    def _finish(self, ids: list[int], reason: str, sampling: Sampling) -> Generation:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if reason == "stop":
            # Cut right after the first stop string, which stays in the text (the step delimiter).
            cut = min((text.find(s) + len(s) for s in sampling.stop if s in text), default=len(text))
            text = text[:cut]
        return Generation(text=text, num_tokens=len(ids), finish_reason=reason)


def _fill_holes(done: list[bool]) -> list[int]:
    """The rows to keep, as `batch_select_indices` takes them: the live rows beyond the new batch size
    move into the slots of finished ones, the others stay where they are."""
    size = done.count(False)
    keep = list(range(size))
    holes = [b for b in range(size) if done[b]]
    movers = [b for b in range(size, len(done)) if not done[b]]
    for hole, b in zip(holes, movers):
        keep[hole] = b
    return keep


@dataclass
class _Request:
    """A request in a decoding batch: its prompt and settings, its own random stream (seeded with
    the request's seed) and what it has sampled."""

    ticket: int
    prompt: str
    sampling: Sampling
    generator: object  # torch.Generator
    ids: list[int] = field(default_factory=list)  # the prompt's tokens
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None


class _Batch:
    """The rows decoding together. `admit` prefills requests and joins their cache rows to the
    running ones; every `step` samples one token for each row, from the row's own stream, and runs
    the model once; rows that finish leave at once (the last rows move into their slots)."""

    def __init__(self, policy: HFPolicy):
        self.policy = policy
        self.rows: list[_Request] = []
        self.cache = self.attention = self.positions = self.logits = None  # of the rows, in their order
        self.computed = 0  # row-steps run by the model

    def admit(self, requests: list[_Request]) -> None:
        import torch

        from .kvcache import common_prefix, join_prompts, keep, prefill, share_prompts, warm

        p = self.policy
        # Identical prompts (N samples of a problem, M expansions of a beam) are prefilled once and
        # their keys and values shared by their rows (copied where the cache cannot share): the
        # prompt, not the sampled tokens, dominates the work on a CPU. Prefixes run by earlier calls
        # come from the store.
        unique = list(dict.fromkeys(r.prompt for r in requests))
        row_of = {text: i for i, text in enumerate(unique)}
        enc = [p.tokenizer(text, add_special_tokens=False).input_ids for text in unique]
        for r in requests:
            r.ids = enc[row_of[r.prompt]]
        p.prompt_tokens_full += sum(len(r.ids) for r in requests)
        if len(enc) > 1:  # e.g. the system prompt of every problem: run it once
            p.prompt_tokens += warm(p.model.base_model, p.store, [common_prefix(enc)], p.pad_id)
        pre = prefill(p.model, enc, p.store, p.pad_id, logits_to_keep=1)
        p.prompt_tokens += pre.ran
        keep(p.store, pre, enc)
        rows = [row_of[r.prompt] for r in requests]
        index = torch.tensor(rows, device=p.device)  # one row per request from here on
        attention, positions = pre.attention[index], pre.positions[index, -1:]
        logits = pre.out.logits[index, -1, :].float()
        with torch.inference_mode():
            if self.cache is None:
                if p.shared_prompts:  # decoding steps read each prompt once, not once per request
                    share_prompts(pre.cache, rows)
                elif len(unique) < len(requests):
                    pre.cache.batch_select_indices(index)
                self.cache, self.attention, self.positions, self.logits = pre.cache, attention, positions, logits
            elif p.shared_prompts:
                self.attention = join_prompts(self.cache, pre.cache, rows, self.attention, attention)
                self.positions = torch.cat([self.positions, positions])
                self.logits = torch.cat([self.logits, logits])
            else:
                raise RuntimeError(f"policy {p.name}: rows join a running batch only over a shared-prompt cache")
        self.rows += requests
        log.debug("%d rows joined (%d prompts, %d prompt tokens run); %d decoding", len(requests), len(unique),
                  pre.ran, len(self.rows))

    def step(self) -> list[_Request]:
        """Sample a token for every row and run the model on the rows still going; the finished rows."""
        import torch

        from .kvcache import decode_mask, row_kv, trim_unattended

        p = self.policy
        with torch.inference_mode():
            sampled = self._sample()
            for b, (r, token) in enumerate(zip(self.rows, sampled)):
                r.tokens.append(token)
                r.finish = p._finished(r.tokens, r.sampling)
                if r.finish == "stop" and p.store is not None:
                    # the next prompt of a search is this one plus the step: keep what was run
                    p.store.add(r.ids + r.tokens[:-1], lambda b=b: row_kv(self.cache, b, self.attention[b]))
            if p.progress is not None:
                p.progress(len(sampled))
            done = [r.finish is not None for r in self.rows]
            finished = [r for r in self.rows if r.finish is not None]
            if all(done):  # the next rows start a new cache
                log.debug("batch done: %d row-steps run", self.computed)
                self.rows, self.cache, self.attention, self.positions, self.logits = [], None, None, None, None
                return finished
            if finished:  # on a growing or shared-prompt cache only the rows that fill holes move
                keep = _fill_holes(done)
                index = torch.tensor(keep, device=p.device)
                self.cache.batch_select_indices(index)
                self.attention, self.positions = self.attention[index], self.positions[index]
                self.rows, sampled = [self.rows[b] for b in keep], [sampled[b] for b in keep]
                if p.shared_prompts:  # the rows that left may leave positions nobody attends to
                    self.attention = trim_unattended(self.cache, self.attention)
            self.positions = self.positions + 1
            self.attention = torch.cat([self.attention, self.attention.new_ones((len(self.rows), 1))], dim=-1)
            self.computed += len(self.rows)
            # A shared-prompt cache is attended over whole (its mask covers the rows' room); other
            # caches get the 2D mask, from which transformers builds each layer type's own.
            mask = decode_mask(self.cache, self.attention, p.model.dtype) if p.shared_prompts else self.attention
            out = p.model(input_ids=torch.tensor(sampled, device=p.device).unsqueeze(-1), attention_mask=mask,
                          position_ids=self.positions, use_cache=True, logits_to_keep=1,
                          **{p.cache_kw: self.cache})
            self.logits = out.logits[:, -1, :].float()
        return finished

    def _sample(self) -> list[int]:
        """Each row's next token; rows of one temperature and top_p are drawn together."""
        settings: dict[tuple[float, float], list[int]] = {}
        for b, r in enumerate(self.rows):
            settings.setdefault((r.sampling.temperature, r.sampling.top_p), []).append(b)
        tokens = [0] * len(self.rows)
        for members in settings.values():
            logits = self.logits if len(members) == len(self.rows) else self.logits[members]
            drawn = HFPolicy._sample(logits, self.rows[members[0]].sampling, [self.rows[b].generator for b in members])
            for b, token in zip(members, drawn):
                tokens[b] = token
        return tokens


class HFStream:
    """A continuous `Stream` over an `HFPolicy`: queued requests join the running decoding batch
    whenever it has room (`max_batch` rows), and `collect` returns as soon as any request finishes.
    A request samples what it would alone or in `generate`: its own random stream, and a cache
    whose padding and other rows it does not attend to."""

    continuous = True

    def __init__(self, policy: HFPolicy):
        self.policy = policy
        self.batch = _Batch(policy)
        self.queue: list[_Request] = []
        self.tickets = 0

    def add(self, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[int]:
        start = self.tickets
        self.queue += self.policy._requests(prompts, sampling, seeds, start)
        self.tickets += len(prompts)
        return list(range(start, self.tickets))

    def busy(self) -> int:
        return len(self.queue) + len(self.batch.rows)

    def collect(self) -> list[tuple[int, Generation]]:
        finished: list[_Request] = []
        while not finished and self.busy():
            room = self.policy.max_batch - len(self.batch.rows)
            if self.queue and room > 0:
                self.batch.admit(self.queue[:room])
                self.queue = self.queue[room:]
            finished = self.batch.step()
        return [(r.ticket, self.policy._finish(r.tokens, r.finish, r.sampling)) for r in finished]
