"""Tiny random models and small data files, built once per test session; no hub, no shared data needed."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from compress.evalset import EvalSet

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "film", "plot", "actor", "scene", "story", "fun", "dull", "slow", "fast", "love", "hate", "the", "a", "is", "was", "not", "very", "really", "quite", "an", "and", "but", "of", "to", "it", "this", "that"]


POSITIVE, NEGATIVE = ("good", "great", "fun", "love"), ("bad", "awful", "dull", "hate")
FILLER = [w for w in WORDS if w not in POSITIVE + NEGATIVE]

# Eight rows of different lengths for the classification and causal-LM eval sets below.
SENTENCES = [
    "good movie and a great plot",
    "awful film",
    "the actor was not very fun but the story was",
    "dull slow scene",
    "i love this really fast story",
    "bad",
    "quite a good film",
    "hate the plot and the actor and the scene",
]
LABELS = [1, 0, 1, 0, 1, 0, 1, 0]


def _sentence(rng: random.Random, positive: bool) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 12))] + [rng.choice(POSITIVE if positive else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


def _bert_tokenizer(directory: Path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)


def _llama_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(1)
    corpus = [_sentence(rng, i % 2 == 0) for i in range(200)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", model_input_names=["input_ids", "attention_mask"])


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BertModel checkpoint (no task head), like the embedded MiniLM but tiny and random."""
    import torch
    from transformers import BertConfig, BertModel

    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = _bert_tokenizer(directory)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=160)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _llama_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_classifier(tiny_bert_dir):
    """(model, tokenizer): the tiny BERT with a seeded 2-label head, in eval mode. Shared: do not change it."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).eval()
    return model, AutoTokenizer.from_pretrained(tiny_bert_dir)


@pytest.fixture(scope="session")
def tiny_causal_lm(tiny_llama_dir):
    """(model, tokenizer): the tiny Llama in eval mode. Shared: do not change it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="session")
def bert_int8_fused_artifact(tiny_classifier, tmp_path_factory) -> Path:
    """Dynamic int8 of the ONNX Runtime-fused graph: QAttention and QEmbedLayerNormalization, which ONNX Runtime
    runs and OpenVINO has no conversion rule for."""
    from compress.artifact import Artifact
    from compress.export.onnx import export_onnx, fuse_for_onnxruntime
    from compress.export.quantize import quantize_dynamic_int8
    from compress.kinds import Kind

    model, tokenizer = tiny_classifier
    scratch = tmp_path_factory.mktemp("bert-fused")
    graph = export_onnx(model, "sequence-classification", scratch / "fused.onnx", opset=17)
    fuse_for_onnxruntime(graph, model.config)
    quantize_dynamic_int8(graph, scratch / "model.onnx", per_channel=False, reduce_range=False)
    return Artifact("sequence-classification", model.config, tokenizer, onnx_path=scratch / "model.onnx",
                    kind=Kind("onnx", "int8-dynamic", runtime="onnxruntime"),
                    source="tiny").save(tmp_path_factory.mktemp("bert-int8-fused"))


def _tokenized(tokenizer) -> dict[str, np.ndarray]:
    """Right-padded int64 features of SENTENCES."""
    return {k: v.astype(np.int64) for k, v in tokenizer(SENTENCES, padding=True, return_tensors="np").items()}


@pytest.fixture(scope="session")
def classification_evalset(tiny_classifier) -> EvalSet:
    _, tokenizer = tiny_classifier
    return EvalSet("sequence-classification", _tokenized(tokenizer), tokenizer.pad_token_id, np.array(LABELS))


@pytest.fixture(scope="session")
def lm_evalset(tiny_causal_lm) -> EvalSet:
    """Right-padded rows of different lengths; every real token but the first is scored."""
    _, tokenizer = tiny_causal_lm
    features = _tokenized(tokenizer)
    target_mask = features["attention_mask"].astype(bool)
    target_mask[:, 0] = False
    return EvalSet("causal-lm", features, tokenizer.pad_token_id, target_mask=target_mask)


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory) -> dict[str, Path]:
    """train.tsv (200 rows) and dev.tsv (40 rows) with string labels, learnable from the mood words."""
    directory = tmp_path_factory.mktemp("sentiment")
    rng = random.Random(0)
    paths = {}
    for split, rows in (("train", 200), ("dev", 40)):
        lines = ["sentence\tlabel"]
        for i in range(rows):
            positive = i % 2 == 0
            lines.append(f"{_sentence(rng, positive)}\t{'positive' if positive else 'negative'}")
        paths[split] = directory / f"{split}.tsv"
        paths[split].write_text("\n".join(lines) + "\n")
    return paths


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    rng = random.Random(2)
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text("\n".join(_sentence(rng, i % 3 == 0) + " ." for i in range(300)) + "\n")
    return path


@pytest.fixture
def write_recipe(tmp_path, tiny_bert_dir, sentiment_files):
    """Writes a recipe for the tiny BERT on the sentiment files with `steps`, quick to benchmark; returns its path."""
    import yaml

    def write(steps: list[dict]) -> str:
        raw = {
            "model": str(tiny_bert_dir),
            "task": "sequence-classification",
            "data": {"train": {"path": str(sentiment_files["train"]), "text": "sentence"},
                     "eval": {"path": str(sentiment_files["dev"]), "text": "sentence"}, "max_length": 32},
            "steps": steps,
            "bench": {"runs": 10, "warmup": 1, "real_length_samples": 2, "seq_len": 16},
        }
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    return write


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (clone the project beside ../shared)")
    return SHARED_DATA
