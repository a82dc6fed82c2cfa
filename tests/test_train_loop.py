"""The one training loop, qdlib.train.fit: resume, the best checkpoint and the NaN guard, for every recipe.

Each recipe trains on a tiny config. ``toy`` is a small linear model whose loss draws dropout masks from the
global generators, so a resume that did not restore them would differ; the others are qdlib's trainees.
"""

import json
import random
import shutil

import pytest
import torch

from qdlib.errors import ConfigError
from qdlib.train import FitConfig, Recipe, TrainingStopped, fit, group_lr, lr_factor


# ----------------------------------------------------------------------------- the recipes, each on a tiny config


class Toy(Recipe):
    """y = W x on fixed data, a dropout mask from the global torch generator and noise from Python's ``random``."""

    def __init__(self, learning_rate=0.05):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(8, 1)
        self.learning_rate = learning_rate
        g = torch.Generator().manual_seed(1)
        self.x, self.w = torch.randn(64, 8, generator=g), torch.randn(8, 1, generator=g)

    def parameters(self):
        return list(self.model.parameters())

    def batch(self, step, micro):
        i = torch.arange(8) + 8 * ((2 * step + micro) % 8)
        return self.x[i], self.x[i] @ self.w

    def loss(self, batch, autocast):
        x, y = batch
        noise = random.random() * 1e-3
        return ((self.model(torch.nn.functional.dropout(x, 0.2)) - y) ** 2).mean() + noise, {"noise": noise}

    def score(self):
        with torch.no_grad():
            err = ((self.model(self.x) - self.x @ self.w) ** 2).mean().item()
        return -err, {"mse": err}

    def save(self, folder, info):
        torch.save(self.model.state_dict(), folder / "toy.pt")

    def state_dict(self):
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])

    def config(self):
        return {"learning_rate": self.learning_rate}


def toy_factory(tmp_path_factory):
    def make(run_dir, **change):
        fc = FitConfig(**{"steps": 6, "learning_rate": 0.05, "warmup_steps": 2, "min_lr_ratio": 0.1,
                          "checkpoint_every": 2, "eval_every": 3, "accumulation": 2, **change})
        return Toy(fc.learning_rate), fc
    return make


def feature_factory(tmp_path_factory):
    """The feature-fed draft on the bundled teacher; data and validation set are prepared once for every run."""
    from qdlib.feature_draft import build_feature_draft
    from qdlib.feature_train import FeatureRecipe, feature_recipe, fit_config
    from qdlib.models import load_teacher
    from test_feature_draft import small_config

    teacher, tok = load_teacher("tiny")
    prepared, _ = feature_recipe(small_config(), tmp_path_factory.mktemp("feature_data"), teacher, tok,
                                 log=lambda s: None)

    def make(run_dir, **change):
        cfg = small_config(**change)
        torch.manual_seed(cfg.seed)
        draft = build_feature_draft(teacher, cfg.num_layers).float().train()
        return FeatureRecipe(teacher, draft, prepared.data, prepared.val, cfg, bf16=False), fit_config(cfg)
    return make


def distill_factory(tmp_path_factory):
    """Layer-sampled distillation from a tiny random 28-layer teacher; data and cache are prepared once."""
    from transformers import AutoTokenizer

    from helpers import tiny_qwen3
    from qdlib import paths
    from qdlib.trainer import distill_recipe, share_prepared
    from test_distill_train import VOCAB, small_cfg

    teacher, tok = tiny_qwen3(vocab=VOCAB, hidden=64), AutoTokenizer.from_pretrained(paths.TEACHER_DIR)
    prepared = tmp_path_factory.mktemp("distill_data")
    distill_recipe(small_cfg(), prepared, teacher=teacher, tokenizer=tok, progress=False, log=lambda *_: None)

    def make(run_dir, **change):
        cfg = small_cfg(num_epochs=2, steps_per_epoch=3, checkpoint_every=2, **change)
        return distill_recipe(cfg, share_prepared(prepared, run_dir), teacher=teacher, tokenizer=tok, progress=False,
                              log=lambda *_: None)
    return make


def memory_factory(tmp_path_factory):
    """Retrieval training of a tiny draft's fusion blocks; the items' cache and rows are built once."""
    from transformers import AutoTokenizer

    from helpers import tiny_qwen3
    from qdlib import build_draft, paths
    from qdlib.memory_train import MemoryRecipe, RetrievalConfig, fit_config, retrieval_data

    tok = AutoTokenizer.from_pretrained(paths.TEACHER_DIR)
    teacher = tiny_qwen3(vocab=len(tok), hidden=32, layers=4, seed=12)
    base = dict(items=12, val_items=4, memory_items=5, batch_items=2, steps=6, eval_every=3, answer_tokens=6,
                new_tokens=6, warmup_steps=2)
    data = retrieval_data(teacher, tok, RetrievalConfig(**base), tmp_path_factory.mktemp("memory_data"))

    def make(run_dir, **change):
        cfg = RetrievalConfig(**{**base, **change})
        torch.manual_seed(0)
        draft = build_draft(teacher, [0, 3], knowledge_enhancement={"enabled": True, "cache_dim": 32, "num_heads": 1})
        return MemoryRecipe(teacher, draft, data, cfg), fit_config(cfg)
    return make


def teacher_factory(tmp_path_factory):
    """The bundled teacher's training on a tiny config (64 wide, a 400-token vocabulary); its corpus is prepared once."""
    from qdlib.teacher import teacher_recipe
    from test_teacher_training import tiny_cfg

    prepared = tmp_path_factory.mktemp("teacher_data")
    teacher_recipe(tiny_cfg(), prepared, log=lambda *_: None)

    def make(run_dir, **change):
        run_dir.mkdir(parents=True, exist_ok=True)
        for src in prepared.iterdir():
            if not (run_dir / src.name).exists():
                (shutil.copytree if src.is_dir() else shutil.copy)(src, run_dir / src.name)
        return teacher_recipe(tiny_cfg(steps=4, ul_steps=2, ul_batch=2, ul_prompt_tokens=8, ul_new_tokens=8,
                                       eval_every=3, checkpoint_every=2, **change), run_dir, log=lambda *_: None)
    return make


FACTORIES = {"toy": toy_factory, "feature": feature_factory, "distill": distill_factory, "memory": memory_factory,
             "teacher": teacher_factory}
RECIPES = [pytest.param(name, marks=[] if name == "toy" else [pytest.mark.slow]) for name in FACTORIES]


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = FACTORIES[name](tmp_path_factory)
        return cache[name]
    return get


def weights(run_dir):
    return torch.load(run_dir / "last.pt", weights_only=True)["trainee"]


def flat(state, prefix=""):
    """The tensors of a nested state dict, by dotted name."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def log_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the three tests, over every recipe


@pytest.mark.parametrize("name", RECIPES)
def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(name, factories, tmp_path):
    make = factories(name)
    a, b = tmp_path / "a", tmp_path / "b"
    fit(*make(a), a, log=lambda s: None)
    # Ctrl-C during the step-3 evaluation, then between steps 4 and 5: resumed twice
    recipe, fc = make(b)
    real = type(recipe).score

    def ctrl_c_in_eval(self):
        raise KeyboardInterrupt

    type(recipe).score = ctrl_c_in_eval
    try:
        with pytest.raises(KeyboardInterrupt, match=r"interrupted at step 3 of 6; rerun the same call to resume from "
                                                     r".*last.pt$"):
            fit(recipe, fc, b, log=lambda s: None)
    finally:
        type(recipe).score = real
    assert torch.load(b / "last.pt", weights_only=True)["pending_eval"] is True

    def ctrl_c_at_4(step):
        if step == 4:
            raise KeyboardInterrupt

    said = []
    with pytest.raises(KeyboardInterrupt, match=r"interrupted at step 4 of 6"):
        fit(*make(b), b, log=said.append, on_step=ctrl_c_at_4)
    assert said[0] == "resuming from step 3 of 6"
    fit(*make(b), b, log=lambda s: None)
    wa, wb = flat(weights(a)), flat(weights(b))
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert json.loads((a / "best" / "fit.json").read_text()) == json.loads((b / "best" / "fit.json").read_text())
    # an evaluation row for each of steps 3 and 6 in the resumed log, as in the uninterrupted one
    assert [r["step"] for r in log_rows(b) if "eval" in r] == [3, 6]
    # the lr column is the schedule's rate after each step
    fc = make(tmp_path / "c")[1]
    rows = [r for r in log_rows(a) if "loss" in r]
    assert [r["lr"] for r in rows] == pytest.approx([group_lr(fc, fc.learning_rate, s) for s in range(1, 7)])
    # other settings, or a checkpoint of the old loops, are refused with a clear message
    with pytest.raises(ConfigError, match="was made with other settings"):
        fit(*make(b, learning_rate=0.5), b, log=lambda s: None)
    torch.save({"model": {}, "step": 2}, b / "last.pt")
    with pytest.raises(ConfigError, match=r"last.pt was written by an older qdlib training loop .* delete it"):
        fit(*make(b), b, log=lambda s: None)


@pytest.mark.parametrize("name", RECIPES)
def test_the_best_checkpoint_is_the_best_score_and_never_replaced_by_a_worse_one(name, factories, tmp_path):
    make = factories(name)
    a = tmp_path / "a"
    fit(*make(a), a, log=lambda s: None)
    evals = [r for r in log_rows(a) if "eval" in r]
    best = json.loads((a / "best" / "fit.json").read_text())
    top = max(evals, key=lambda r: r["score"])
    assert len(evals) == 2 and best == {"score": top["score"], "step": top["step"]}
    # a best checkpoint better than anything this run reaches stays as it is
    b = tmp_path / "b"
    (b / "best").mkdir(parents=True)
    (b / "best" / "fit.json").write_text(json.dumps({"score": 1e9, "step": -1}))
    fit(*make(b), b, log=lambda s: None)
    assert json.loads((b / "best" / "fit.json").read_text()) == {"score": 1e9, "step": -1}
    assert sorted(p.name for p in (b / "best").iterdir()) == ["fit.json"]
    # a best/ of unknown score (no fit.json) is not silently overwritten
    (b / "best" / "fit.json").unlink()
    with pytest.raises(ConfigError, match="no fit.json"):
        fit(*make(tmp_path / "b"), b, log=lambda s: None)


class Poisoned:
    """A recipe whose loss is NaN at the given (0-based) steps; everything else is the wrapped recipe's."""

    def __init__(self, inner, bad_steps):
        self.inner, self.bad_steps, self.step = inner, bad_steps, None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def optimizer(self, fc):
        return self.inner.optimizer(fc)

    def batch(self, step, micro):
        self.step = step
        return self.inner.batch(step, micro)

    def loss(self, batch, autocast):
        loss, stats = self.inner.loss(batch, autocast)
        return (loss * float("nan") if self.step in self.bad_steps else loss), stats


@pytest.mark.parametrize("name", RECIPES)
def test_a_non_finite_step_is_skipped_and_too_many_in_a_row_stop(name, factories, tmp_path):
    make = factories(name)
    recipe, fc = make(tmp_path / "a")
    seen = {}
    state = fit(Poisoned(recipe, {1}), fc, tmp_path / "a", log=lambda s: None,
                on_step=lambda s: seen.__setitem__(s, {k: v.clone() for k, v in flat(recipe.state_dict()).items()}))
    assert state.bad_steps == 1 and state.step == 6
    assert [r["skipped"] for r in log_rows(tmp_path / "a") if "loss" in r] == [False, True, False, False, False, False]
    assert all(torch.equal(seen[1][k], seen[2][k]) for k in seen[1])  # the skipped step changed nothing
    assert any(not torch.equal(seen[2][k], seen[3][k]) for k in seen[2])  # the next one did
    assert all(torch.isfinite(v).all() for v in seen[6].values() if v.is_floating_point())
    recipe, fc = make(tmp_path / "b")
    fc.max_bad_steps = 2
    with pytest.raises(TrainingStopped, match=r"3 steps in a row had a non-finite loss .*max_bad_steps=2"):
        fit(Poisoned(recipe, {0, 1, 2, 3}), fc, tmp_path / "b", log=lambda s: None)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["state"]["bad_in_row"] == 3


# ----------------------------------------------------------------------------- one schedule, one KL


def test_the_schedule_is_transformers_cosine_with_warmup_and_a_floor():
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    for warmup, total, floor in ((0, 4, 0.0), (2, 6, 0.1), (5, 37, 0.1)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=floor)
        for step in range(total + 1):
            assert lr_factor(step, warmup=warmup, total=total, min_ratio=floor) == pytest.approx(
                opt.param_groups[0]["lr"], abs=1e-12), (warmup, total, step)
            opt.step()
            sched.step()
    assert lr_factor(50, warmup=2, total=6, min_ratio=0.1) == pytest.approx(0.1)  # past the end: the floor


def test_kl_is_written_once():
    """Every KL(p || q) of qdlib goes through qdlib.divergence.kl; a copy of its formula elsewhere fails here."""
    import re
    from pathlib import Path

    from qdlib.divergence import kl

    package = Path(__file__).resolve().parent.parent / "qdlib"
    formula = re.compile(r"\.exp\(\)\s*\*\s*\(\s*\w+\s*-\s*\w+")  # p * (log p - log q)
    copies = [f"{p.relative_to(package)}:{i}" for p in sorted(package.rglob("*.py")) if p.name != "divergence.py"
              for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if formula.search(line)]
    assert copies == []
    assert formula.search("(lp.exp() * (lp - lq)).sum(-1)")  # the pattern finds the formula as it was copied
    lp = torch.log_softmax(torch.randn(3, 5), -1)
    lq = torch.log_softmax(torch.randn(3, 5), -1)
    ref = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl(lp, lq), ref)
    assert (kl(lp, lq) > 0).all() and torch.equal(kl(lp, lp), torch.zeros(3))
