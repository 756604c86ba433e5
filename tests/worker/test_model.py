"""The model on real weights (SmolLM2-135M-Instruct GGUF) and on the tiny MSA checkpoint."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch

import kernels
from worker.checkpoint import default_model_path, inspect_model
from worker.config import EngineConfig
from worker.engine.kv_cache import AttentionMetadata, KVCache
from worker.engine.llm_engine import LLMEngine
from worker.errors import InvalidRequestError, ModelLoadError
from worker.loader import load_model
from worker.wire import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24)


def _forward_logits(loaded, token_ids: list[int], topk: int) -> torch.Tensor:
    """All-position logits of one sequence, its pages deliberately scattered and unordered."""
    num_tokens = len(token_ids)
    num_pages = -(-num_tokens // 128)
    cache = KVCache(loaded.config, num_pages + 2, torch.float32, torch.device("cpu"))
    pages = list(range(num_pages + 2))[::-1][:num_pages]
    slots = torch.tensor([pages[p // 128] * 128 + p % 128 for p in range(num_tokens)])
    attn = AttentionMetadata(cu_seqlens_q=torch.tensor([0, num_tokens], dtype=torch.int32),
                             seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
                             block_table=torch.tensor([pages], dtype=torch.int32),
                             slot_mapping=slots, max_seq_len=num_tokens)
    with torch.inference_mode():
        hidden = loaded.model(torch.tensor(token_ids), torch.arange(num_tokens), attn, cache, topk)
        return loaded.model.compute_logits(hidden)


@pytest.fixture(scope="module")
def hf_reference():
    """transformers' own Llama implementation of the same GGUF, and its tokenizer."""
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


@pytest.fixture(scope="module")
def default_loaded():
    return load_model(None, torch.float32, torch.device("cpu"))


def test_logits_match_transformers(default_loaded, hf_reference):
    hf_model, _ = hf_reference
    text = default_loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Explain paged attention in two sentences. " * 40}])
    ids = default_loaded.tokenizer.encode(text)
    assert len(ids) > 128, "the prompt must span several pages"
    ours = _forward_logits(default_loaded, ids, topk=10**6)
    with torch.inference_mode():
        ref = hf_model(torch.tensor([ids])).logits[0].float()
    assert (ours - ref).abs().max().item() < 1e-3


@pytest.mark.parametrize("text", [
    "Hello 12345 world!  it's",
    "naïve café 🎉 über\n\n  tabs\tand   spaces",
    "def f(x):\n    return x**2  # comment",
    "<|im_start|>user\nhi<|im_end|>\n",
])
def test_tokenizer_matches_transformers(default_loaded, hf_reference, text):
    _, hf_tokenizer = hf_reference
    ours = default_loaded.tokenizer.encode(text)
    assert ours == hf_tokenizer.encode(text, add_special_tokens=False)
    assert default_loaded.tokenizer.decode(ours, skip_special_tokens=False) == text


def test_exported_tokenizer_loads_in_transformers_and_encodes_as_the_server(tmp_path):
    """`msa-serve export-tokenizer`: the GGUF's tokenizer as a Hugging Face directory."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "tokenizer"
    subprocess.run([sys.executable, "-m", "deployments.cli", "export-tokenizer", str(out)],
                   check=True, capture_output=True, timeout=120)
    ours = inspect_model(None).tokenizer
    exported = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "naïve café 🎉 12345 <|im_start|>user\nhi<|im_end|>\n def f(x): return x**2"
    assert exported.encode(text, add_special_tokens=False) == ours.encode(text)
    assert exported.eos_token == ours.eos_token == "<|im_end|>"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert exported.apply_chat_template(messages, tokenize=False,
                                        add_generation_prompt=True) == \
        ours.apply_chat_template(messages)
    assert exported.model_max_length == inspect_model(None).config.max_position_embeddings


def test_capital_of_france(default_engine):
    prompt = default_engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}])
    out = default_engine.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert "Paris" in out.text


def _haystack_prompt(tokenizer, num_sentences: int) -> str:
    """A fact at the very start, then varied everyday sentences, then the question."""
    rng = random.Random(0)
    subjects = ["The committee", "A local farmer", "The old librarian", "Our neighbour",
                "The river ferry", "A young engineer", "The town council", "The bakery"]
    verbs = ["reviewed", "painted", "repaired", "discussed", "measured", "visited", "described"]
    objects = ["the bridge", "a new schedule", "the harvest", "the museum roof", "twelve bicycles",
               "the station clock", "a budget report", "the garden wall"]
    filler = " ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} on day "
                      f"{rng.randint(1, 300)}." for _ in range(num_sentences))
    document = "Important: the secret code word is PINEAPPLE. " + filler
    return tokenizer.apply_chat_template([{"role": "user", "content": document +
                                           "\n\nWhat is the secret code word? Answer with the word only."}])


def test_haystack_answer_early_in_a_long_prompt_with_topk_16(default_engine, monkeypatch):
    prompt = _haystack_prompt(default_engine.tokenizer, 225)
    num_tokens = len(default_engine.tokenizer.encode(prompt))
    assert 2900 <= num_tokens <= 3200
    assert default_engine.model_config.msa.topk == 16
    selections = []
    real_select = kernels.select_blocks

    def spy(*args, **kwargs):
        blocks = real_select(*args, **kwargs)
        selections.append(blocks)
        return blocks

    monkeypatch.setattr(kernels, "select_blocks", spy)
    out = default_engine.generate([prompt], GREEDY, use_tqdm=False)[0]
    # Attention really was sparse: queries past 2,048 tokens kept 16 of up to 25 blocks.
    assert selections and max(int((b >= 0).sum(-1).max()) for b in selections) == 16
    assert "PINEAPPLE" in out.text.upper()


@pytest.mark.xfail(strict=True, reason=(
    "known limit of the derived indexer on this 135M model: with one sentence repeated ~100 "
    "times the filler blocks score alike and crowd out the fact's block in some layers; dense "
    "attention answers, topk 16 does not. strict: a pass means this limit is gone."))
def test_haystack_of_one_repeated_sentence(default_engine):
    filler = ("The weather report said the day would be mild with light winds from the west. "
              "Farmers in the valley checked their fields and the market opened at nine. ") * 100
    prompt = default_engine.tokenizer.apply_chat_template([{"role": "user", "content":
        "Important: the secret code word is PINEAPPLE. " + filler
        + "\n\nWhat is the secret code word? Answer with the word only."}])
    assert len(default_engine.tokenizer.encode(prompt)) > 3000
    out = default_engine.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert "PINEAPPLE" in out.text.upper()


def test_tiny_msa_checkpoint_runs_sparse(tiny_model_dir):
    """The learned index branch, MoE layers and dense layer load; topk changes the output."""
    loaded = load_model(tiny_model_dir, torch.float32, torch.device("cpu"))
    assert loaded.config.msa.indexer == "learned" and loaded.config.num_experts == 4
    rng = random.Random(1)
    ids = [rng.randrange(3, loaded.config.vocab_size) for _ in range(700)]
    sparse = _forward_logits(loaded, ids, topk=2)
    dense = _forward_logits(loaded, ids, topk=100)
    # Positions before 256 see at most 2 blocks either way; later ones differ under topk 2.
    assert torch.allclose(sparse[:256], dense[:256], atol=1e-4)
    assert (sparse[400:] - dense[400:]).abs().max() > 1e-2


def test_prompt_longer_than_context(default_engine):
    too_long = [100] * default_engine.max_model_len
    with pytest.raises(InvalidRequestError, match="context is 8192 tokens"):
        default_engine.add_request(too_long, GREEDY)


def test_unknown_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no model at"):
        load_model(tmp_path / "missing", torch.float32, torch.device("cpu"))


def test_corrupt_gguf(tmp_path):
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(default_model_path().read_bytes()[:100_000])
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        load_model(corrupt, torch.float32, torch.device("cpu"))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_model(garbage, torch.float32, torch.device("cpu"))


def test_checkpoint_weights_must_match_config(tiny_model_dir, tmp_path):
    broken = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] = 5
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(broken, torch.float32, torch.device("cpu"))
    config["model_type"] = "gpt2"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported model_type"):
        LLMEngine(EngineConfig(model=str(broken), device="cpu"))
