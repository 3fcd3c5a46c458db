import json

import pytest
import torch
from datasets import Dataset

from compress import train as train_module
from compress.errors import BadInput
from compress.loaders import train_loader
from compress.settings import TrainSettings
from compress.train import Callback, resolve_precision, scores_on, train

QUERY = "bert.encoder.layer.0.attention.self.query.weight"


@pytest.fixture
def rows(sentiment_files) -> Dataset:
    """Eight labelled rows: four batches of two."""
    lines = sentiment_files["train"].read_text().splitlines()[1:9]
    texts, labels = zip(*(line.split("\t") for line in lines))
    return Dataset.from_dict({"text": list(texts), "label": [int(label == "positive") for label in labels]})


@pytest.fixture
def make_model(tiny_bert_dir):
    """A fresh tiny classifier, the same one each call (with dropout, so resuming must restore the RNG)."""
    from transformers import AutoModelForSequenceClassification

    def make():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)

    return make


@pytest.fixture
def loader(rows, tiny_classifier):
    return train_loader(rows, tiny_classifier[1], "sequence-classification", 32, batch_size=2, seed=0)


def settings(**changes) -> TrainSettings:
    return TrainSettings(**{"lr": 1e-3, "warmup_ratio": 0.0, **changes})


class Recorder(Callback):
    def __init__(self, name: str, events: list) -> None:
        self.name, self.events = name, events

    def on_batch_start(self, state, batch):
        self.events.append((self.name, "batch", state.step, state.micro_step))

    def on_after_backward(self, state, model):
        assert all(p.grad is not None for p in model.classifier.parameters())
        self.events.append((self.name, "backward", state.step, state.micro_step))

    def on_step_end(self, state, model):
        assert all(p.grad is None for p in model.classifier.parameters())  # zeroed for the next step
        self.events.append((self.name, "step", state.step, state.micro_step))

    def on_epoch_end(self, state, model):
        self.events.append((self.name, "epoch", state.step, state.micro_step))

    def on_train_end(self, state, model):
        self.events.append((self.name, "end", state.step, state.micro_step))


def test_hooks_run_in_order_once_per_micro_batch_or_step(make_model, loader):
    events = []
    summary = train(make_model(), loader, settings(epochs=2, grad_accum=3), seed=0, quiet=True,
                    callbacks=[Recorder("a", events), Recorder("b", events)])
    expected, step = [], 0
    for _ in range(2):  # 4 micro-batches per epoch, 3 per step: steps of 3 and 1
        micro = 0
        for size in (3, 1):
            for _ in range(size):
                expected += [("batch", step, micro)] * 2
                micro += 1
            step += 1
            expected += [("backward", step - 1, micro)] * 2 + [("step", step, micro)] * 2
        expected += [("epoch", step, micro)] * 2
    expected += [("end", step, 0)] * 2
    assert [event[1:] for event in events] == expected
    assert [event[0] for event in events] == ["a", "b"] * (len(events) // 2)  # in the order given
    assert summary["steps"] == 4 and summary["samples"] == 16


class MaskHolder(Callback):
    """Zeroes the first half of a weight's rows after every optimizer step, as a pruning pass would."""

    def __init__(self, model) -> None:
        self.weight = model.get_parameter(QUERY)
        self.mask = torch.ones_like(self.weight, dtype=torch.bool)
        self.mask[: len(self.mask) // 2] = False
        with torch.no_grad():
            self.weight.mul_(self.mask)

    def on_step_end(self, state, model):
        with torch.no_grad():
            self.weight.mul_(self.mask)


def test_a_callback_keeps_masked_weights_exactly_zero(make_model, loader):
    model = make_model()
    before = model.get_parameter(QUERY).detach().clone()
    holder = MaskHolder(model)
    train(model, loader, settings(epochs=2, grad_accum=2), seed=0, quiet=True, callbacks=[holder])
    after = model.get_parameter(QUERY).detach()
    assert torch.equal(after[~holder.mask], torch.zeros_like(after[~holder.mask]))
    assert not torch.allclose(after[holder.mask], before[holder.mask])  # the rest was trained


class Penalty(Callback):
    def __init__(self, weight: float) -> None:
        self.weight = weight

    def extra_loss(self, state, model):
        return self.weight * model.classifier.weight.pow(2).sum()


class GradientTap(Callback):
    def on_after_backward(self, state, model):
        self.weight = model.classifier.weight.detach().clone()
        self.grad = model.classifier.weight.grad.clone()


def test_an_extra_loss_from_a_callback_adds_its_gradient(make_model, loader):
    plain, penalised = GradientTap(), GradientTap()
    train(make_model(), loader, settings(max_steps=1, grad_accum=2), seed=0, quiet=True, callbacks=[plain])
    train(make_model(), loader, settings(max_steps=1, grad_accum=2), seed=0, quiet=True,
          callbacks=[Penalty(100.0), penalised])
    assert torch.equal(plain.weight, penalised.weight)
    assert torch.allclose(penalised.grad - plain.grad, 200.0 * plain.weight, atol=1e-5)


class Tally(Callback):
    """Callback state with a plain value and a tensor, to be carried through checkpoints."""

    def __init__(self) -> None:
        self.steps, self.loss_sum = 0, torch.zeros(())

    def on_step_end(self, state, model):
        self.steps += 1
        self.loss_sum += state.loss

    def state_dict(self):
        return {"steps": self.steps, "loss_sum": self.loss_sum}

    def load_state_dict(self, state):
        self.steps, self.loss_sum = state["steps"], state["loss_sum"]


class Crash(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_end(self, state, model):
        if state.step == self.at_step:
            raise RuntimeError("power cut")


# The crash comes before its step's checkpoint. The newest one before it: (2, 1) ends epoch 1, before its
# evaluation; (3, 1) is mid-epoch; (1, 2) is mid-epoch 2, between steps of two micro-batches.
@pytest.mark.parametrize(("every", "grad_accum", "crash_at", "steps"),
                         [(2, 1, 5, 8), (3, 1, 5, 8), (1, 2, 4, 4)])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, make_model, loader,
                                                            classification_evalset, every, grad_accum,
                                                            crash_at, steps):
    config = settings(epochs=2, checkpoint_every=every, grad_accum=grad_accum)
    run = {"seed": 0, "quiet": True, "evaluate": scores_on(classification_evalset)}
    whole, whole_tally = make_model(), Tally()
    expected = train(whole, loader, config, callbacks=[whole_tally], **run)

    with pytest.raises(RuntimeError, match="power cut"):
        train(make_model(), loader, config, callbacks=[Tally(), Crash(crash_at)], checkpoint_dir=tmp_path,
              **run)
    saved_at = (crash_at - 1) // every * every
    (checkpoint,) = tmp_path.iterdir()  # only the newest, complete one
    assert checkpoint.name == f"step-{saved_at:08d}"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["model.safetensors", "state.json",
                                                            "state.safetensors"]  # no pickle
    assert json.loads((checkpoint / "state.json").read_text())["state"]["step"] == saved_at

    resumed, tally = make_model(), Tally()
    summary = train(resumed, loader, config, callbacks=[tally, Callback()], checkpoint_dir=tmp_path, **run)
    assert summary["resumed_from_step"] == saved_at
    for name, value in whole.state_dict().items():
        assert torch.allclose(resumed.state_dict()[name], value, rtol=0, atol=1e-7), name
    assert tally.steps == whole_tally.steps == steps  # restored at the checkpoint's count, then counted on
    assert torch.allclose(tally.loss_sum, whole_tally.loss_sum, rtol=0, atol=1e-6)
    assert summary["evals"] == expected["evals"] and len(expected["evals"]) == 2
    assert (summary["steps"], summary["samples"]) == (steps, 16)
    assert summary["final_loss"] == expected["final_loss"]


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path, make_model, loader):
    train(make_model(), loader, settings(max_steps=2, checkpoint_every=2), seed=0, quiet=True,
          checkpoint_dir=tmp_path)
    other = settings(max_steps=2, checkpoint_every=2, lr=2e-3)
    summary = train(make_model(), loader, other, seed=0, quiet=True, checkpoint_dir=tmp_path)
    assert summary["resumed_from_step"] is None and summary["steps"] == 2


def test_fp16_on_a_cpu_is_refused_naming_the_setting(make_model, loader):
    with pytest.raises(BadInput, match="precision: fp16 needs a CUDA GPU"):
        train(make_model(), loader, settings(precision="fp16"), seed=0, quiet=True)


@pytest.mark.parametrize(("isa", "expected"), [(["avx2", "amx_bf16"], "bf16"), (["avx512_bf16"], "bf16"),
                                               (["avx2", "avx512f"], "fp32")])
def test_auto_precision_takes_bf16_where_the_cpu_has_it(monkeypatch, isa, expected):
    monkeypatch.setattr(train_module, "machine_info", lambda: {"isa": isa})
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_bf16_training_records_its_precision_and_learns(make_model, loader):
    model = make_model()
    before = model.get_parameter(QUERY).detach().clone()
    summary = train(model, loader, settings(max_steps=2, precision="bf16"), seed=0, quiet=True)
    assert summary["precision"] == "bf16" and summary["final_loss"] == summary["final_loss"]  # not NaN
    assert model.get_parameter(QUERY).dtype == torch.float32  # autocast: the weights stay fp32
    assert not torch.equal(model.get_parameter(QUERY).detach(), before)


def test_the_progress_bar_is_named_after_the_pass(make_model, loader, capsys):
    train(make_model(), loader, settings(max_steps=1), seed=0, desc="distill")
    assert "distill" in capsys.readouterr().err
    train(make_model(), loader, settings(max_steps=1), seed=0, desc="distill", quiet=True)
    assert "distill" not in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_training_and_evaluation_run_on_the_gpu(make_model, loader, classification_evalset, precision):
    model = make_model()
    summary = train(model, loader, settings(epochs=2, precision=precision), seed=0, quiet=True,
                    evaluate=scores_on(classification_evalset))
    assert next(model.parameters()).device.type == "cuda"
    assert summary["precision"] == ("fp16" if precision == "fp16" else "bf16")
    assert [e["epoch"] for e in summary["evals"]] == [1, 2] and 0 <= summary["evals"][-1]["accuracy"] <= 1
