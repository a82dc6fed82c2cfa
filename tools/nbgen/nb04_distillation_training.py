"""Source of notebooks/04_distillation_training.ipynb: `python tools/nbgen/nb04_distillation_training.py`
writes the notebook (without outputs); execute it headless as the README says to store its outputs."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from nbtools import build  # noqa: E402

exec((HERE / "common.py").read_text())

cells = [
("md", r"""
# 04 · Distillation: teaching the draft to think like the teacher

A draft cut from the teacher (notebook 01) keeps 6 of its 28 layers and loses most of its judgement: it agrees
with the teacher's next token only a fraction of the time. **Distillation** trains the draft on the teacher's
own next-token distributions, so that it predicts what *the teacher* would say, which is exactly what
speculative decoding rewards.

**Learning objectives.** After this notebook you can
1. write the distillation loss (temperature-scaled KL plus cross-entropy) and the total-variation objective on
   tiny tensors, and match `qdlib.distill`;
2. explain why the draft trains on sequences the teacher generated itself, and why the evaluation paraphrases of
   the knowledge items are never trained on;
3. run a short distillation with `qdlib.trainer.distill` (progress bar, checkpoints, resume) and read its curves;
4. read the committed reference draft's card and the ablations: knowledge on/off, KL vs TVD.

**Prerequisites.** Notebooks 01 (the draft), 02 (the cache) and 03 (the fusion).
"""),
("code", SETUP),
("code", VERSIONS, ["nbval-ignore-output"]),
("md", r"""
## 1. The loss, written out

For one position, let p be the teacher's next-token distribution and q the draft's, both at temperature T
(softmax of logits / T). The course's loss is

    loss = w · T² · KL(p_T || q_T) + (1 − w) · CE(q, next token in the data)

with w = `kl_divergence_weight` (0.8) and T = 1. The T² keeps the gradient size comparable across temperatures
(Hinton et al., 2015). Padding positions are masked out of the mean.

The alternative objective is the **total-variation distance** 1 − Σₓ min(p(x), q(x)). It is exactly the chance
that speculative sampling rejects a draft token, so minimising it maximises the acceptance rate directly
(DistillSpec, Zhou et al. 2023).
"""),
("code", r'''from qdlib import distill as D
torch.manual_seed(0)
B, T, V = 2, 3, 5
t_logits, d_logits = torch.randn(B, T, V), torch.randn(B, T, V)   # (B, T, V)
labels = torch.randint(V, (B, T))                                   # (B, T): the data's next tokens
mask = torch.tensor([[True, True, True], [True, True, False]])     # (B, T): the last slot of row 2 is padding
temp, w = 2.0, 0.8

p = torch.softmax(t_logits / temp, -1)
log_q = torch.log_softmax(d_logits / temp, -1)
kl = (p * (p.log() - log_q)).sum(-1)                                # (B, T)
ce = -torch.log_softmax(d_logits, -1).gather(-1, labels[..., None])[..., 0]   # (B, T), at temperature 1
m = mask.float()
mine = w * temp**2 * (kl * m).sum() / m.sum() + (1 - w) * (ce * m).sum() / m.sum()
lib = D.distill_loss(d_logits, t_logits, labels, mask, kl_weight=w, temperature=temp)
torch.testing.assert_close(mine, lib)

accept = torch.minimum(torch.softmax(t_logits, -1), torch.softmax(d_logits, -1)).sum(-1)   # (B, T)
torch.testing.assert_close(1 - (accept * m).sum() / m.sum(), D.tvd_loss(d_logits, t_logits, mask))
print(f"inline loss {mine.item():.4f} == qdlib; mean acceptance sum min(p, q) = {(accept * m).sum().item() / m.sum().item():.4f}")'''),
("md", r"""
## 2. What the draft learns from

`qdlib.distill_data` mixes three kinds of rows in every batch:

- **text**: windows of the teacher's training text (the standard library's training files, never the
  held-out ones);
- **generated**: training prompts continued *greedily by the teacher*. At decoding time the draft must guess the
  teacher's next token on the teacher's own output, so it should practise on exactly that (sequence-level
  distillation, Kim & Rush 2016);
- **items**: the knowledge questions and their *training* paraphrases, followed by the teacher's continuation,
  so the fusion gate has something to gain from the cache. The *evaluation* paraphrases stay unseen.

DistillSpec's on-policy option (rows the draft samples itself, scored by the teacher) is `on_policy_share`.
"""),
("code", r'''from qdlib.distill_data import build_distill_data, item_texts
from qdlib.knowledge import load_items
teacher, tok = qdlib.load_teacher(device=DEVICE)
items = load_items(None, teacher)
data = build_distill_data(teacher, tok, generated=8, seq_len=64, items=items, item_new_tokens=32,
                          generated_share=0.5, item_share=0.2, max_text_tokens=50_000, progress=False)
print("text tokens:", len(data.text), "| generated rows:", tuple(data.generated.shape), "| item rows:", len(data.items))
assert not set(item_texts(items, "train")) & set(item_texts(items, "eval"))
print("evaluation paraphrases in the training rows: none")
ids, valid = data.batch(step=0, rows=6, seq_len=64)
print("batch:", tuple(ids.shape), "| scored positions per row:", valid.sum(1).tolist())
print(repr(tok.decode(data.generated[0, 32:64])))'''),
("md", r"""
## 3. A short run

`qdlib.trainer.distill` is the trainer behind `qd distill`. It is built on Accelerate (the same code runs on
several GPUs with `accelerate launch`), uses AdamW with warm-up and cosine decay, clips gradients, skips and
counts any step whose loss is not finite, evaluates every epoch, keeps the best draft by validation agreement
in `best/`, and writes `last.pt` atomically so that an interrupted run (Ctrl-C included) resumes where it
stopped.

We train the uniform 6-of-28 draft with knowledge for a minute, twice: once with the KL objective and once with
TVD, same data and budget. The run folder is under the git-ignored `outputs/runs/`.
"""),
("code", r'''from qdlib.trainer import distill, plot_curves
from qdlib import paths
run_root = paths.runs_dir() / "nb04"
import shutil; shutil.rmtree(run_root, ignore_errors=True)

def short_config(objective):
    cfg = D.load_config(D.DEFAULT_CONFIGS["tiny"])
    t = cfg.training
    t.objective, t.batch_size, t.max_seq_length = objective, 8, 128
    t.num_epochs, t.steps_per_epoch, t.learning_rate = 2, 20, 2e-3
    t.generated_sequences, t.max_text_tokens = 16, 200_000
    t.eval_prompts, t.eval_new_tokens = 12, 32
    return cfg

runs = {}
for objective in ("kl", "tvd"):
    runs[objective] = distill(short_config(objective), run_root / objective, teacher=teacher, tokenizer=tok)''',
 ["nbval-ignore-output"]),
("code", r'''again = distill(short_config("kl"), run_root / "kl", teacher=teacher, tokenizer=tok, progress=False,
                log=lambda *_: None)
assert again["steps"] == runs["kl"]["steps"] == 40   # rerunning resumes: nothing left to do
print("the second call resumed at step", again["steps"], "and trained nothing more")'''),
("code", r"""from qdlib.trainer import eval_sets, evaluate_draft
val = eval_sets(teacher, tok, n_prompts=12, seed=1, items=items, new_tokens=32)   # the validation prompts of the runs
from qdlib.knowledge import load_knowledge_cache
cache = load_knowledge_cache(run_root / "kl" / "knowledge_cache", teacher)
untrained = qdlib.build_draft(teacher, qdlib.sample_layers(28, 6), knowledge_enhancement=short_config("kl").knowledge_block())
rows = {"untrained": evaluate_draft(teacher, untrained, val, cache)}
for objective, r in runs.items():
    rows[objective.upper()] = [x for x in r["history"] if "eval" in x][-1]["eval"]
print(f"{'draft':10} {'agreement':>9} {'alpha':>6} {'KL':>6} | {'paraphrase agreement':>20}")
for name, ev in rows.items():
    h = ev["heldout"]
    print(f"{name:10} {h['agreement']:9.3f} {h['alpha']:6.3f} {h['kl']:6.3f} | {ev['paraphrase']['agreement']:20.3f}")""",
 ["nbval-ignore-output"]),
("code", r"""for objective in ("KL", "TVD"):
    assert rows[objective]["heldout"]["agreement"] > rows["untrained"]["heldout"]["agreement"], objective
    assert rows[objective]["heldout"]["kl"] < rows["untrained"]["heldout"]["kl"], objective
print("both objectives beat the untrained draft on agreement and KL after 40 steps")
fig = plot_curves(run_root / "kl")
plt.show()"""),
("md", r"""
Two minutes of training on a laptop is a taste. Which objective is ahead after so few steps varies from run to
run; the reference draft below had the full budget.

## 4. The reference draft

`qd distill --config tiny` trains the course's reference draft (uniform 6 of 28, knowledge on) and
`--export outputs/reference_draft` measures the best epoch on **test** prompts (held-out prompts with another
seed than the validation prompts that picked the epoch) and writes weights, cache, card and curves.
`qdlib.load_draft()` loads it with its knowledge cache attached.
"""),
("code", r"""import json
from IPython.display import Image, Markdown, display
draft = qdlib.load_draft()
card = json.loads((paths.DRAFT_DIR / "metrics.json").read_text())
print("layers:", draft.config.kept_layers, "| knowledge cache attached:", draft.knowledge is not None)
print("trained", card["steps"], "steps; best epoch at step", card["best_step"])
print(f"test agreement (50 held-out prompts): {card['agreement']:.3f}  (course bar 0.80)")
display(Image(filename=str(paths.DRAFT_DIR / "curves.png")))"""),
("md", r"""
The card's number is recomputed here from the shipped weights, on the same 50 test prompts:
"""),
("code", r"""from qdlib.trainer import EVAL_SEED_TEST
test = eval_sets(teacher, tok, n_prompts=50, seed=EVAL_SEED_TEST)
recomputed = evaluate_draft(teacher, draft, {"heldout": test["heldout"]}, draft.knowledge)["heldout"]["agreement"]
print(f"recomputed agreement {recomputed:.3f}")
assert abs(recomputed - card["agreement"]) < 1e-3"""),
("md", r"""
## 5. Ablations: what helped?

The same draft was trained without the knowledge path under the same budget (`qd distill --no-knowledge`).
Every figure below is read from the committed `metrics.json` files; "no cache" is the knowledge draft with its
cache detached.
"""),
("code", r"""abl = json.loads((paths.DRAFT_NOKNOW_DIR / "metrics.json").read_text())
table = [("knowledge draft, cache attached", card["test"]["heldout"], card["test"]["paraphrase"]),
         ("knowledge draft, cache detached", card["test"]["heldout_no_cache"], card["test"]["paraphrase_no_cache"]),
         ("draft trained without knowledge", abl["test"]["heldout"], abl["test"]["paraphrase"])]
print(f"{'':34} {'held-out code':>22} | {'item paraphrases':>22}")
print(f"{'':34} {'agreement':>10} {'alpha':>11} | {'agreement':>10} {'alpha':>11}")
for name, h, ph in table:
    print(f"{name:34} {h['agreement']:10.3f} {h['alpha']:11.3f} | {ph['agreement']:10.3f} {ph['alpha']:11.3f}")"""),
("code", r"""def effect(a, b):
    d = a - b
    return f"{'+' if d >= 0 else '-'}{abs(d) * 100:.1f} points"

para_gain = effect(card["test"]["paraphrase"]["agreement"], abl["test"]["paraphrase"]["agreement"])
code_gain = effect(card["test"]["heldout"]["agreement"], abl["test"]["heldout"]["agreement"])
cache_use = effect(card["test"]["paraphrase"]["agreement"], card["test"]["paraphrase_no_cache"]["agreement"])
display(Markdown(f"On the item paraphrases the knowledge draft scores **{para_gain}** against the draft trained "
                 f"without knowledge, on ordinary held-out code **{code_gain}**. Detaching its cache changes its "
                 f"paraphrase agreement by **{cache_use}**: that is how much of the difference the cache itself "
                 f"carries at inference time."))"""),
("md", r"""
How to read it: the knowledge path can only help where a prompt resembles a cached item; on ordinary code there
is nothing to look up, and the cross-attention is extra compute (notebook 03 counted it). A small difference
either way on held-out code is noise of the training run, not a property of the method. Notebook 06 measures
what each draft is worth in wall-clock time.

## Summary

- The distillation loss is w·T²·KL(p‖q) + (1−w)·CE; the TVD objective 1 − Σ min(p, q) is one minus the
  acceptance probability itself.
- The draft practises on the teacher's own greedy continuations, on training text, and on the knowledge items'
  questions and training paraphrases; the evaluation paraphrases are never trained on.
- The trainer is resumable, skips non-finite steps, keeps the best epoch by validation agreement, and runs
  unchanged on several processes through Accelerate.
- Agreement on the teacher's greedy continuations is the number that predicts greedy speculative speed-up; the
  reference draft's card reports it on test prompts that never chose a checkpoint.

## Exercises

**Exercise 1.** Write `kl_at_temperature(d_logits, t_logits, T)`: the mean over positions of
T² · KL(softmax(t/T) ‖ softmax(d/T)) (no mask).
"""),
("code", r"""def kl_at_temperature(d_logits, t_logits, T):
    ### BEGIN SOLUTION
    lp = torch.log_softmax(t_logits / T, -1)
    lq = torch.log_softmax(d_logits / T, -1)
    return T**2 * (lp.exp() * (lp - lq)).sum(-1).mean()
    ### END SOLUTION"""),
("code", r"""from qdlib.exercises import check
for T_ in (1.0, 2.0):
    _ = check(f"Exercise 1 (T = {T_})", kl_at_temperature, d_logits, t_logits, T_,
              expected=D.kl_loss(d_logits, t_logits, temperature=T_),
              hint="KL(p||q) = sum p (log p - log q), both at temperature T, times T**2")"""),
("md", r"""
**Exercise 2.** Write `acceptance(t_logits, d_logits)`: the mean over positions of Σₓ min(p(x), q(x)), the
chance that speculative sampling accepts a draft token.
"""),
("code", r"""def acceptance(t_logits, d_logits):
    ### BEGIN SOLUTION
    return torch.minimum(t_logits.softmax(-1), d_logits.softmax(-1)).sum(-1).mean()
    ### END SOLUTION"""),
("code", r"""_ = check("Exercise 2", acceptance, t_logits, d_logits, expected=1 - D.tvd_loss(d_logits, t_logits),
          hint="elementwise minimum of the two softmaxes, summed over the vocabulary")"""),
("md", r"""
**Exercise 3.** `train_params: fusion` trains only the cross-attention fusion. How many parameters is that for
the reference draft? Count the parameters whose name starts with `fusion.`.
"""),
("code", r"""def fusion_parameters(model):
    ### BEGIN SOLUTION
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("fusion."))
    ### END SOLUTION"""),
("code", r"""from qdlib.trainer import set_trainable
import copy
probe = copy.deepcopy(draft)
_ = check("Exercise 3", fusion_parameters, draft,
          expected=sum(p.numel() for n, p in probe.named_parameters() if n in set(set_trainable(probe, "fusion"))),
          hint="named_parameters() gives (name, tensor) pairs")"""),
]
build(cells, HERE.parent.parent / "notebooks" / "04_distillation_training.ipynb")
print("built")
