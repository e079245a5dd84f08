"""The results of a logit check (`lmadapt.hf.logit_check`) and the report tools/check_hf.py prints.

`CheckReport.failures()` decides: a tokenizer difference, a max |logit difference| above atol (NaN included), a
greedy-decode difference that is no near tie, or a problem outside those (transformers cannot load the directory,
the vocabularies differ). `exit_code()`: 0 passed, 1 failed, 3 passed what could be compared without transformers.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TokenizerResult:
    """lmadapt's tokenizer against the reference's on every text."""

    texts: int
    mismatches: int = 0
    first_text: str | None = None
    position: int | None = None
    candidate_ids: list[int] | None = None  # a few ids from the first differing position
    reference_ids: list[int] | None = None
    problem: str = ""  # a failure other than differing ids (e.g. only one side has a tokenizer)

    @property
    def failed(self) -> bool:
        return bool(self.mismatches or self.problem)


@dataclasses.dataclass
class LogitResult:
    """Both models on the same ids."""

    rows: int
    tokens: int
    max_abs_diff: float
    where: tuple[int, int]  # (row, position) of the max difference
    mean_kl: float  # KL(reference || candidate), nats per token
    top1_agreement: float


@dataclasses.dataclass
class GenerationResult:
    """Greedy decode with each side's KV cache from one prompt."""

    prompt: list[int]
    candidate: list[int]
    reference: list[int]
    candidate_text: str
    reference_text: str
    first_diff: int | None = None
    margin: float | None = None  # the reference's logit of its token minus of the candidate's, at first_diff

    @property
    def equal(self) -> bool:
        return self.first_diff is None

    def near_tie(self, atol: float) -> bool:
        """The first difference is a choice between two tokens the reference scores within atol (a negative
        margin would mean the reference's own decode disagrees with its logits: no tie)."""
        return self.margin is not None and abs(self.margin) <= atol


@dataclasses.dataclass
class CheckReport:
    """Everything one check found; `lines()` prints it, `exit_code()` is the tool's status."""

    candidate: str
    reference: str | None
    dtype: str
    atol: float
    tokenizer: TokenizerResult | None = None
    logits: LogitResult | None = None
    generation: GenerationResult | None = None
    problems: list[str] = dataclasses.field(default_factory=list)  # failures outside the three comparisons
    notes: list[str] = dataclasses.field(default_factory=list)
    reference_is_transformers: bool = True

    def failures(self) -> list[str]:
        out = list(self.problems)
        if self.tokenizer is not None and self.tokenizer.failed:
            out.append("tokenizer")
        if self.logits is not None and not self.logits.max_abs_diff <= self.atol:  # NaN fails too
            out.append(f"max |logit diff| {self.logits.max_abs_diff:.3g} > atol {self.atol:g}")
        gen = self.generation
        if gen is not None and not gen.equal and not gen.near_tie(self.atol):
            out.append("generation")
        return out

    def exit_code(self) -> int:
        if self.failures():
            return 1
        return 0 if self.reference is not None and self.reference_is_transformers else 3

    def lines(self) -> list[str]:
        """The report as printed by tools/check_hf.py."""
        return _report_lines(self)


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _mark(failed: bool) -> str:
    return "FAIL" if failed else "ok"


def _tokenizer_lines(t: TokenizerResult) -> list[str]:
    if t.problem:
        return [f"tokenizer: {t.problem}  [FAIL]"]
    if not t.mismatches:
        return [f"tokenizer: {t.texts} texts, all encode identically  [ok]"]
    assert t.first_text is not None
    return [f"tokenizer: {t.mismatches} of {t.texts} texts encode differently  [FAIL]",
            f"  first: {_short(t.first_text)} differs at token {t.position}: lmadapt {t.candidate_ids} vs "
            f"reference {t.reference_ids}"]


def _generation_lines(g: GenerationResult, atol: float) -> list[str]:
    n = len(g.candidate)
    if not g.reference and g.candidate:
        return [f"generation ({n} tokens, greedy, KV cache), lmadapt only: {_short(g.candidate_text, 200)}"]
    if g.equal:
        head = f"generation ({n} tokens, greedy, KV cache): tokens equal: yes  [ok]"
    else:
        tie = g.near_tie(atol)
        j = g.first_diff
        assert j is not None and g.margin is not None
        head = (f"generation ({n} tokens, greedy, KV cache): tokens equal: no, from token {j} (lmadapt "
                f"{g.candidate[j]}, reference {g.reference[j]}; the reference's margin there {g.margin:.3g}"
                + (", within atol: a near tie)  [ok]" if tie else ")  [FAIL]"))
    return [head, f"  lmadapt:   {_short(g.candidate_text, 200)}", f"  reference: {_short(g.reference_text, 200)}"]


def _report_lines(r: CheckReport) -> list[str]:
    out = [f"candidate: {r.candidate}", f"reference: {r.reference or 'none'}",
           f"compute dtype: {r.dtype}, atol {r.atol:g}"]
    out += [f"note: {n}" for n in r.notes]
    out += [f"problem: {p}  [FAIL]" for p in r.problems]
    if r.tokenizer is not None:
        out += _tokenizer_lines(r.tokenizer)
    if r.logits is not None:
        lg = r.logits
        out.append(f"logits: {lg.rows} rows, {lg.tokens} tokens: max |diff| {lg.max_abs_diff:.3g} (row {lg.where[0]}, "
                   f"position {lg.where[1]}), mean KL(reference || lmadapt) {lg.mean_kl:.3g} nats/token, top-1 "
                   f"agreement {100 * lg.top1_agreement:.1f}%  [{_mark(not lg.max_abs_diff <= r.atol)}]")
    if r.generation is not None:
        out += _generation_lines(r.generation, r.atol)
    failures = r.failures()
    code = r.exit_code()
    out.append("result: FAIL (" + "; ".join(failures) + ")" if failures else
               "result: PASS" if code == 0 else "result: NOT CHECKED against transformers (exit 3)")
    return out
