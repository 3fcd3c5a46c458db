import torch

from compress import models
from compress.context import Context
from compress.data import build_eval_set, load_task_data
from compress.passes import finetune
from compress.recipe import FinetuneStep, Recipe


def setup(tmp_path, model_dir, files, task="sequence-classification", **data):
    recipe = Recipe.model_validate({
        "model": str(model_dir), "task": task, "seed": 0,
        "data": data or {"train": {"path": str(files["train"]), "text": "sentence"},
                         "eval": {"path": str(files["dev"]), "text": "sentence"}, "max_length": 32},
    })
    task_data = load_task_data(recipe.data, task)
    loaded = models.load(str(model_dir), task, task_data.label_names)
    artifact = loaded.artifact()
    ctx = Context(stage_dir=tmp_path, task=task, seed=0, max_length=recipe.data.max_length, data=task_data,
                  make_eval_set=lambda tok, split: build_eval_set(task_data, tok, recipe.data, split),
                  quiet=True)
    return artifact, ctx


def test_finetune_learns_the_task_and_records_it(tmp_path, tiny_bert_dir, sentiment_files):
    artifact, ctx = setup(tmp_path, tiny_bert_dir, sentiment_files)
    splits, build = [], ctx.make_eval_set
    ctx.make_eval_set = lambda tok, split: splits.append(split) or build(tok, split)
    tuned = finetune.run(artifact, FinetuneStep(epochs=6, batch_size=16, lr=5e-3, warmup_ratio=0.0), ctx)
    record = tuned.history[-1]
    # 200 rows less 20 withheld for validation: 180 rows, 12 batches of 16 per epoch.
    assert record["kind"] == "finetune" and record["effect"]["steps"] == 6 * 12
    assert record["effect"]["metric"] == "accuracy" and record["effect"]["evals_on"] == "validation"
    assert set(splits) == {"validation"}  # the eval split is the reported metric: never tuned on
    accuracies = [e["accuracy"] for e in record["effect"]["evals"]]
    assert len(accuracies) == 6 and accuracies[-1] >= 0.9  # the mood words give the label away


def test_frozen_embeddings_do_not_move(tmp_path, tiny_bert_dir, sentiment_files):
    artifact, ctx = setup(tmp_path, tiny_bert_dir, sentiment_files)
    before = {k: v.clone() for k, v in artifact.model.state_dict().items()}
    tuned = finetune.run(artifact, FinetuneStep(max_steps=3, batch_size=16, freeze_embeddings=True), ctx)
    after = tuned.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if ".embeddings." in k)
    assert not torch.equal(before["bert.encoder.layer.0.attention.self.query.weight"],
                           after["bert.encoder.layer.0.attention.self.query.weight"])
    assert tuned.history[-1]["effect"]["frozen_parameters"] > 0
    assert all(p.requires_grad for p in tuned.model.parameters())


def test_causal_lm_finetune_lowers_perplexity(tmp_path, tiny_llama_dir, text_file):
    artifact, ctx = setup(tmp_path, tiny_llama_dir, None, task="causal-lm",
                          train={"path": str(text_file)}, eval={"path": str(text_file)}, max_length=32,
                          max_eval_tokens=256)
    tuned = finetune.run(artifact, FinetuneStep(epochs=2, batch_size=8, lr=3e-3, warmup_ratio=0.0), ctx)
    first, last = (e["perplexity"] for e in tuned.history[-1]["effect"]["evals"])
    assert last < first < len(artifact.tokenizer) * 2


def test_parameters_frozen_in_the_input_stay_frozen(tmp_path, tiny_bert_dir, sentiment_files):
    artifact, ctx = setup(tmp_path, tiny_bert_dir, sentiment_files)
    frozen_layer = artifact.model.bert.encoder.layer[0]
    frozen_layer.requires_grad_(False)
    before = {k: v.clone() for k, v in frozen_layer.state_dict().items()}
    tuned = finetune.run(artifact, FinetuneStep(max_steps=2, batch_size=16, freeze_embeddings=True), ctx)
    model = tuned.model
    assert not any(p.requires_grad for p in model.bert.encoder.layer[0].parameters())
    assert all(torch.equal(before[k], v) for k, v in model.bert.encoder.layer[0].state_dict().items())
    assert all(p.requires_grad for p in model.bert.embeddings.parameters())  # frozen by the step only
    assert all(p.requires_grad for p in model.bert.encoder.layer[1].parameters())
