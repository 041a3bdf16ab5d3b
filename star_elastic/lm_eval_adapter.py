"""lm-evaluation-harness on one budget of an elastic checkpoint (or any checkpoint `load` reads).

    python -m star_elastic.lm_eval_adapter --model star-elastic \
        --model_args pretrained=CKPT,budget=0.5 --tasks wiki_next_sentence --include_path examples/lm_eval

runs lm_eval's own command line with the `star-elastic` model registered. lm_eval is optional
(`pip install 'star-elastic[lmeval]'`): the scoring below (`BudgetScorer`) needs only torch, and the
registered class is defined only when lm_eval imports. The other route needs no adapter: export the
budget with `star-elastic slice CKPT --budget 0.5 --out DIR` and run `lm_eval --model hf
--model_args pretrained=DIR` (a stock Hugging Face checkpoint for homogeneous budgets).

Scoring follows lm_eval's Hugging Face model: the continuation's tokens are those of
encode(context + continuation) after encode(context); an empty context is replaced by the document
separator token; inputs longer than `max_length` lose their oldest tokens. Rolling log-likelihoods
score every token of a text once, in windows of `max_length` tokens, the first preceded by the
separator token.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .errors import StarElasticError


class BudgetScorer:
    """Log-likelihoods and greedy continuations of one model (a budget's sliced model)."""

    def __init__(self, model, tokenizer, max_length: int = 2048, batch_size: int = 8):
        from .data import document_separator

        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length, self.batch_size = int(max_length), int(batch_size)
        sep = document_separator(tokenizer)
        self.prefix_token = sep if sep is not None else tokenizer.eos_token_id
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, pretrained, budget=None, dtype=None, device=None, **kwargs) -> "BudgetScorer":
        """An elastic checkpoint's budget (sliced once), or a plain checkpoint when `budget` is None."""
        from .elastic.checkpoint import budget_names, is_elastic_checkpoint, load_elastic
        from .elastic.slicing import slice_model
        from .hf import load, load_tokenizer, require_tokenizer

        if budget is not None:
            if not is_elastic_checkpoint(pretrained):
                raise StarElasticError(f"{pretrained}: budget={budget} needs an elastic checkpoint (no manifest.json)")
            ckpt = load_elastic(pretrained, dtype=dtype, device=device)
            names = budget_names(ckpt.manifest)
            name = str(budget)
            if name not in names:  # lm_eval's argument parser turns "0.50" into 0.5: match by value too
                name = next((n for n in names if _same_number(n, budget)), name)
            spec = ckpt.spec(name)
            # the full budget is the full model (with a delta of its own, merged), not a slice of the shared weights
            model = ckpt.full_model() if spec.keeps_parent(ckpt.model.config) else slice_model(ckpt.model, spec)
            tokenizer = ckpt.tokenizer
        else:
            model, tokenizer = load(pretrained, dtype=dtype, device=device), load_tokenizer(pretrained)
        return cls(model, require_tokenizer(pretrained, tokenizer), **kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _pair_tokens(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.prefix_token], self.encode(continuation)
        # trailing spaces of the context belong to the continuation (as lm_eval does)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def _score(self, items: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum of the continuation's log-probabilities, whether it
        is the greedy continuation). Right-padded batches: causal models never look right."""
        out = []
        for start in range(0, len(items), self.batch_size):
            batch = items[start:start + self.batch_size]
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for ctx, cont in batch]
            width = max(len(x) for x in inputs)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for i, x in enumerate(inputs):
                ids[i, : len(x)] = torch.tensor(x)
            logp = F.log_softmax(self.model(ids.to(self.device)).float(), dim=-1)
            for i, ((_, cont), x) in enumerate(zip(batch, inputs)):
                n = len(cont)
                rows = logp[i, len(x) - n: len(x)]
                target = torch.tensor(cont, device=rows.device)
                out.append((rows.gather(-1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())))
        return out

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self._score([self._pair_tokens(c, x) for c, x in pairs])

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        out = []
        for text in texts:
            tokens = [self.prefix_token] + self.encode(text)
            # disjoint windows of max_length predicted tokens, each conditioned on the one token before it
            windows = [([tokens[s]], tokens[s + 1: s + 1 + self.max_length])
                       for s in range(0, len(tokens) - 1, self.max_length)]
            out.append(sum(lp for lp, _ in self._score(windows)))
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[tuple[str, dict]]) -> list[str]:
        from .generate import generate

        out = []
        for context, kwargs in requests:
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = torch.tensor([self.encode(context)[-self.max_length:] or [self.prefix_token]], device=self.device)
            new = generate(self.model, ids, int(kwargs.get("max_gen_toks", 256)),
                           temperature=float(kwargs.get("temperature", 0.0) or 0.0),
                           eos_token_id=self.tokenizer.eos_token_id)
            text = self.tokenizer.decode(new[0, ids.shape[1]:], skip_special_tokens=True)
            for stop in until:  # cut at the first stop sequence
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def _same_number(name: str, value) -> bool:
    try:
        return float(name) == float(value)
    except (TypeError, ValueError):
        return False


try:  # the harness' model class, only where lm_eval is installed
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - exercised in CI, which does not install lm_eval
    LM = None

if LM is not None:
    @register_model("star-elastic")
    class StarElasticLM(LM):
        """`--model star-elastic --model_args pretrained=CKPT,budget=NAME[,max_length=2048,dtype=float32]`."""

        def __init__(self, pretrained: str, budget=None, max_length: int = 2048, batch_size=8, device=None,
                     dtype=None, **_ignored):
            super().__init__()
            torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
                device = "cuda" if torch.cuda.is_available() else "cpu"  # lm_eval's default asks for cuda
            batch = 8 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
            self.scorer = BudgetScorer.from_checkpoint(str(pretrained), budget, dtype=torch_dtype, device=device,
                                                       max_length=max_length, batch_size=batch)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood([tuple(r.args) for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self.scorer.generate_until([tuple(r.args) for r in requests])


def main() -> None:
    """lm_eval's command line with the `star-elastic` model registered."""
    if LM is None:
        print("star-elastic: error: lm-evaluation-harness is not installed: pip install 'star-elastic[lmeval]'",
              file=sys.stderr)
        sys.exit(2)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
