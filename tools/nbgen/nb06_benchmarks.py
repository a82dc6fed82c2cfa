"""Source of notebooks/06_benchmarks.ipynb: `python tools/nbgen/nb06_benchmarks.py` writes the notebook
(without outputs); execute it headless as the README says to store its outputs."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from nbtools import build  # noqa: E402

exec((HERE / "common.py").read_text())

cells = [
("md", r"""
# 06 · Benchmarks: is it actually faster?

Speculative decoding is worth exactly what a stopwatch says. This notebook puts every way of decoding with the
teacher side by side, **in one run, on the same prompts and the same machine**, and explains the result: where
the time goes, what the theory predicts, and why the same recipe behaves differently on the real Qwen3-0.6B.

**Learning objectives.** After this notebook you can
1. read a `qd bench` report: tokens per second, speed-up, acceptance, tokens per target call, the cost ratio c,
   and the exactness column;
2. split a speculative generation's time into drafting, verification and overhead, and say which one to attack;
3. predict the speed-up from alpha, c and the verification cost, and compare the prediction with measurement;
4. explain why a 6-of-28 draft of Qwen3-0.6B is held back by its output head, and name the fixes (vocabulary
   trimming, bigger or dynamic gamma, self-speculation, tree verification) and what batching changes.

**Prerequisites.** Notebook 05 (the speculative loop) and notebook 04 (the reference draft).
"""),
("code", SETUP),
("code", VERSIONS, ["nbval-ignore-output"]),
("md", r"""
## 1. The committed reference report

`qd bench --out outputs/bench_reference` produced the report below on the course's reference machine (a 2-core
CPU). Every number in it was measured in that one run: the speed-ups are over the teacher's own greedy
`generate` from the same run, and "identical" counts prompts whose output equals the teacher's greedy output
token for token.
"""),
("code", r"""from IPython.display import Image, Markdown, display
from qdlib import paths
from qdlib.bench import METHODS, headline, load_report, report_markdown
ref = load_report(paths.BENCH_DIR)
env = ref["environment"]
print(f"measured on {env['cpu']} with {env['torch_threads']} torch threads; torch {env['torch']}, "
      f"transformers {env['transformers']}")
h = headline(ref)
print(f"headline (held-out code, greedy): {h['speedup']:.2f}x the teacher's generate, "
      f"identical on {h['identical']}/{h['prompts']} prompts, {h['over_assisted_matched']:.2f}x matched assisted generation")
display(Markdown(report_markdown(ref).split("## Costs")[0].split("\n", 3)[3]))"""),
("code", r"""display(Image(filename=str(paths.BENCH_DIR / "bench.png")))"""),
("md", r"""
How to read the table:

- **tokens/s** is new tokens over wall-clock seconds, summed over the prompts of a kind, median over repeats;
- **speed-up** divides it by the teacher's `generate` in the same run (so the first row is 1.00x by definition);
- **acceptance** is accepted over proposed draft tokens; **tokens/target call** is how many tokens each teacher
  forward pass yields (1 without speculation);
- **c** is one draft step over one teacher step; the lookup methods have no network, so no c;
- **identical**: qdlib's loop is lossless by construction; transformers' assisted generation and prompt lookup
  are also meant to be, and the column checks it.

## 2. Where the time goes

Every speculative round spends time in three places: the draft's γ forward passes, the teacher's one
verification pass over γ + 1 tokens, and everything else (Python bookkeeping, tensor creation, cache cropping).
qdlib's `SpecStats` times the first two, so the third is what remains.
"""),
("code", r"""rows = [r for r in ref["rows"] if "time_split" in r and r["kind"] == "code" and r["mode"] == "greedy"]
labels = [r["label"].replace("qdlib speculative, ", "") for r in rows]
fig, ax = plt.subplots(figsize=(8, 3))
left = [0.0] * len(rows)
for part, colour in (("draft", "tab:orange"), ("verify", "tab:blue"), ("other", "tab:grey")):
    vals = [r["time_split"][part] for r in rows]
    ax.barh(labels, vals, left=left, color=colour, label=part)
    left = [a + b for a, b in zip(left, vals)]
ax.invert_yaxis(); ax.set_xlabel("share of wall-clock time"); ax.legend(loc="lower right"); fig.tight_layout()
plt.show()
c = ref["costs"]
print(f"one teacher step {c['teacher_step_ms']:.2f} ms; c = {c['c']['spec']:.3f} for the reference draft; "
      f"verifying 5 tokens costs {c['verify_cost']['4']:.2f} teacher steps")"""),
("md", r"""
Read it like a profiler: verification is unavoidable work (it is the teacher running, fewer times than
without speculation); drafting is the price of the guesses; "other" is pure overhead. On a CPU with a model this
small, a forward pass is dominated by per-operation overhead rather than arithmetic, which is why c is larger
than the 6/28 share of layers suggests, and why a verification pass over 5 tokens costs little more than one
over 1 token.

## 3. Theory against measurement

Leviathan et al. (2023) give the expected number of tokens per target call, for a per-token acceptance rate α
and γ draft tokens, as (1 − α^(γ+1)) / (1 − α), and the speed-up over plain decoding as that number divided by
the cost of a round in teacher steps, γ·c + v(γ), where v(γ) is the cost of verifying γ + 1 tokens. We write
it inline and check it against `qdlib.metrics`.
"""),
("code", r"""from qdlib.metrics import expected_speedup, expected_tokens_per_call

def speedup(alpha, gamma, c, v):
    tokens = (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * c + v)

alpha = ref["alpha"]["code"]["agreement"]
for s in ref["sweep"]:
    g = s["gamma"]
    mine = speedup(alpha, g, c["c"]["spec"], c["verify_cost"][str(g)])
    assert abs(mine - expected_speedup(alpha, g, c["c"]["spec"], c["verify_cost"][str(g)])) < 1e-12
    assert abs(mine - s["theory_speedup_vs_plain"]) < 1e-9
print(f"alpha (teacher-forced agreement on the bench prompts) = {alpha:.3f}")
print(" gamma | theory tokens/call | measured | theory speed-up | measured (vs plain loop)")
for s in ref["sweep"]:
    print(f"{s['gamma']:6d} | {s['theory_tokens_per_call']:18.2f} | {s['tokens_per_target_call']:8.2f} | "
          f"{s['theory_speedup_vs_plain']:15.2f} | {s['speedup_vs_plain']:.2f}")"""),
("md", r"""
The theory assumes every token is accepted with the same probability α, independently. Real text is burstier:
boilerplate runs are accepted in long streaks, and a hard token is rejected whatever came before. That is why
measured tokens per call can beat the formula at large γ, and why the best γ in practice is found by a sweep.

Try it: the slider below computes the predicted speed-up (`qdlib.metrics.expected_speedup`) for any α, c and γ.
"""),
("code", r"""import ipywidgets as widgets
def predicted(alpha=0.8, c=0.15, gamma=4, verify_cost=1.1):
    print(f"alpha {alpha:.2f}, c {c:.2f}, gamma {gamma}, verify {verify_cost:.2f}: "
          f"{expected_tokens_per_call(alpha, gamma):.2f} tokens/call, "
          f"predicted speed-up {expected_speedup(alpha, gamma, c, verify_cost):.2f}x")
predicted()
_ = widgets.interactive(predicted, alpha=(0.05, 0.95, 0.05), c=(0.02, 1.0, 0.02), gamma=(1, 12), verify_cost=(1.0, 2.0, 0.05))"""),
("md", r"""
## 4. A live (reduced) benchmark on this machine

The same code on your machine, reduced to fit in a minute: 2 prompts of each kind, 32 new tokens, one repeat.
Timings depend on your machine (the cell's output is not compared by the tests); the exactness column does not.
"""),
("code", r"""from qdlib.bench import BenchConfig, run_bench
teacher, tok = qdlib.load_teacher(device=DEVICE)
draft = qdlib.load_draft()
cfg = BenchConfig(n_prompts=2, max_new_tokens=32, repeats=1, temperature=0.0, gammas=(1, 3, 5), sweep_prompts=1,
                  methods=("teacher_generate", "teacher_plain", "spec", "spec_no_cache", "assisted_matched",
                           "prompt_lookup", "retrieval"))
live = run_bench(teacher, tok, draft, cfg, progress=False)
for r in live["rows"]:
    print(f"{r['kind']:10} {r['label']:45} {r['tokens_per_s']:7.1f} tok/s {r['speedup']:5.2f}x")""",
 ["nbval-ignore-output"]),
("code", r"""for r in live["rows"]:
    if r["group"] in ("baseline", "qdlib") or r["method"] == "retrieval":
        assert r["identical"] == r["prompts"], r["label"]
print("qdlib's speculative rows reproduce the teacher's greedy output on every prompt:",
      sorted({r["method"] for r in live["rows"] if r["group"] == "qdlib"}))"""),
("md", r"""
## 5. The real Qwen3-0.6B: the output head

Our bundled teacher has a vocabulary of 8,192 tokens. Qwen3-0.6B has 151,936, and its output head (hidden size
1,024 × vocabulary) is paid once per token by the teacher *and by every draft*. Counting multiply-adds per
token from the config alone (`qdlib.costs`, notebook 00):
"""),
("code", r"""from transformers import Qwen3Config
from qdlib.costs import draft_cost_ratio, head_macs, layer_macs
qwen = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                   num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
print(f"one decoder layer {layer_macs(qwen) / 1e6:.1f}M MACs/token, all 28 {28 * layer_macs(qwen) / 1e6:.0f}M, "
      f"output head {head_macs(qwen) / 1e6:.1f}M")
for vocab in (None, 32_000, 8_000):
    cq = draft_cost_ratio(qwen, 6, vocab=vocab)
    best = max(range(1, 13), key=lambda g: expected_speedup(0.8, g, cq, 1.1))
    print(f"6-of-28 draft, head over {vocab or 151936:>7} tokens: c = {cq:.2f}; at alpha 0.8 the best gamma is "
          f"{best:2d}, predicted {expected_speedup(0.8, best, cq, 1.1):.2f}x")"""),
("md", r"""
With the full vocabulary a 6-layer draft costs 0.42 of the teacher per token, so even a good draft gains little.
What would fix it:

- **Trim the draft's vocabulary** to the frequent tokens (FR-Spec, 2025): the draft's head shrinks, c roughly
  halves at 32k tokens; a rare token the draft cannot propose is simply a rejection, so the output stays exact.
- **Bigger γ and dynamic length**: when c is small, long drafts pay; when the draft is unsure, stop early
  (`confidence_threshold`, the dynamic row of the report).
- **Share instead of copy**: self-speculative methods (Draft & Verify, LayerSkip, SWIFT, Kangaroo) run the
  teacher's *own* layers as the draft and reuse its KV cache, so no second copy of the embeddings or head is
  stored and the draft's cache comes for free.
- **Tree verification** (SpecInfer, EAGLE): verify several candidate continuations in one pass, so one
  rejection does not waste the round.
- **Batch size and serving engines** change the picture: at batch 1 a GPU is memory-bound and verification of
  γ + 1 tokens is nearly free; with large batches the GPU is already busy, extra verified tokens cost real
  compute, and engines such as vLLM turn speculation down or off under load.

## Summary

- A benchmark is only honest when all methods run in one process on the same prompts, with warm-up excluded
  and repeats summarised by a median; qdlib's `qd bench` does exactly that and checks exactness.
- Speed-up = tokens per target call / cost per round; tokens per call come from α and γ, cost from c and the
  verification pass. Overhead outside both is the silent third term.
- On the course's CPU the distilled draft, not the knowledge cache or the lookup methods, carries the speed-up
  on ordinary code; the report shows which method wins on the knowledge paraphrases.
- For the real Qwen3-0.6B the 151,936-token head dominates a shallow draft's cost; vocabulary trimming and
  self-speculation attack exactly that.

## Exercises

**Exercise 1.** Write `tokens_per_call(alpha, gamma)`, the expected number of tokens one target call yields.
"""),
("code", r"""def tokens_per_call(alpha, gamma):
    ### BEGIN SOLUTION
    if alpha >= 1:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)
    ### END SOLUTION"""),
("code", r"""from qdlib.exercises import check
for a_, g_ in ((0.0, 4), (0.7, 3), (0.9, 8), (1.0, 5)):
    _ = check(f"Exercise 1 (alpha {a_}, gamma {g_})", tokens_per_call, a_, g_,
              expected=expected_tokens_per_call(a_, g_), hint="a geometric series: 1 + a + a^2 + ... + a^gamma")"""),
("md", r"""
**Exercise 2.** Using the reference report's α (code prompts), c and verification costs, which γ in the sweep
has the highest *theoretical* speed-up? Write `best_gamma(report)`.
"""),
("code", r"""def best_gamma(report):
    ### BEGIN SOLUTION
    a = report["alpha"]["code"]["agreement"]
    cc = report["costs"]["c"]["spec"]
    return max((s["gamma"] for s in report["sweep"]),
               key=lambda g: expected_speedup(a, g, cc, report["costs"]["verify_cost"][str(g)]))
    ### END SOLUTION"""),
("code", r"""_ = check("Exercise 2", best_gamma, ref, expected=max(ref["sweep"], key=lambda s: s["theory_speedup_vs_plain"])["gamma"],
          hint="expected_speedup(alpha, gamma, c, verify_cost[str(gamma)]) for each gamma of the sweep; take the argmax")"""),
("md", r"""
**Exercise 3.** FR-Spec keeps only the most frequent tokens in the draft's head. Write `trimmed_c(cfg, k, vocab)`:
the cost ratio of a k-layer draft whose head covers `vocab` tokens, from `layer_macs` and the hidden size
(teacher: all layers and the full head).
"""),
("code", r"""def trimmed_c(cfg, k, vocab):
    ### BEGIN SOLUTION
    full = cfg.num_hidden_layers * layer_macs(cfg) + cfg.hidden_size * cfg.vocab_size
    return (k * layer_macs(cfg) + cfg.hidden_size * vocab) / full
    ### END SOLUTION"""),
("code", r"""_ = check("Exercise 3", trimmed_c, qwen, 6, 32_000, expected=draft_cost_ratio(qwen, 6, vocab=32_000),
          hint="MACs per token: k layers + hidden x vocab for the draft, 28 layers + hidden x 151936 for the teacher")"""),
]
build(cells, HERE.parent.parent / "notebooks" / "06_benchmarks.ipynb")
print("built")
