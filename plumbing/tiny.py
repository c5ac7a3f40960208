"""The tiny Qwen2.5-VL every stage runs on a CPU: random weights, the real transformers classes and processor,
and a small byte-level BPE tokenizer trained on the spot with Qwen's special tokens, split regex and chat template.

`--model tiny-qwen` is the same small random model speaking Qwen2.5-VL-7B-Instruct's real tokens: its BPE (read
from ../shared/qwen2-tokenizer), special-token ids, chat template, processor and generation settings, and every
value of its config.json but the widths (build_qwen).

`--model tiny` (and `tiny-text`, a text-only Qwen2 teacher, and `tiny-qwen`) resolve here through
data.resolve_model, which builds the checkpoint once into ~/.cache/x-reasoner (ensure) and then loads it with
from_pretrained like any 7B checkpoint. This file imports nothing of the project (data.py passes it the text to
train the tokenizer on), so it can sit below every stage; torch, tokenizers and transformers are imported where
used ("heavy"), as `import data` stays light.

    python data.py --model tiny      # build (if needed) and print its path
"""
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

VERSION = "tiny-v1"
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
IM_END, ENDOFTEXT = "<|im_end|>", "<|endoftext|>"
# Qwen2's pre-tokenizer split: digits one at a time, so numbers are learnable by a tiny model too.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2.5-VL-7B-Instruct's chat template (image parts become <|vision_start|><|image_pad|><|vision_end|>).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def ensure(name, cache, texts, qwen_files):
    """The directory of tiny model `name` ("tiny", "tiny-text", "tiny-qwen"), built once into `cache` under a name
    that changes with what it is built from (the corpus `texts`, or Qwen's files): built aside, then renamed, as
    ranks may race to build it."""
    if name == "tiny-qwen":
        key = b"".join((Path(qwen_files) / f).read_bytes() for f in ("vocab.json", "merges.txt"))
    else:
        key = repr(corpus(texts)).encode()
    path = Path(cache) / f"{VERSION}-{name}-{hashlib.sha1(key).hexdigest()[:8]}"
    if not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=path.parent, prefix=".tiny-")
        try:
            {"tiny": lambda: build(tmp, texts), "tiny-text": lambda: build_text(tmp, texts),
             "tiny-qwen": lambda: build_qwen(tmp, qwen_files)}[name]()
            os.rename(tmp, path)
        except OSError:
            if not (path / "config.json").exists():  # not just another process finishing first (theirs is identical)
                raise
        finally:  # nothing half-built is left in the cache
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def corpus(texts=()):
    """Text the tiny tokenizer is trained on: `texts` (data.tiny_corpus(): the templates and the toy data, so
    prompts stay short), then every character a prompt may need."""
    texts = list(texts)
    texts.append("0123456789 +-*/=()[]{}<>.,:;!?'\"\\^_$%#&|~` abcdefghijklmnopqrstuvwxyz "
                 "ABCDEFGHIJKLMNOPQRSTUVWXYZ <think> </think> <answer> </answer> \\frac \\sqrt \\boxed")
    return texts * 4


def make_tokenizer(texts=()):
    """A byte-level BPE trained on the spot on corpus(texts) with Qwen's special tokens, split regex and chat
    template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # heavy
    from transformers import PreTrainedTokenizerFast  # heavy
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus(texts), trainers.BpeTrainer(
        vocab_size=1024, special_tokens=QWEN_SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=IM_END, pad_token=ENDOFTEXT,
                                        model_max_length=4096)
    tokenizer.padding_side = "left"  # generation pads on the left; training code pads itself
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer, {t: bpe.token_to_id(t) for t in QWEN_SPECIAL}


def build_text(path, texts=()):
    """A tiny random-weight text-only Qwen2 causal LM (the shape of a teacher such as QwQ-32B), same tokenizer."""
    import torch  # heavy
    from transformers import Qwen2Config, Qwen2ForCausalLM  # heavy
    tokenizer, special = make_tokenizer(texts)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=special[ENDOFTEXT],
                         eos_token_id=special[IM_END], pad_token_id=special[ENDOFTEXT])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = [special[IM_END], special[ENDOFTEXT]]
    model.generation_config.pad_token_id = special[ENDOFTEXT]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def build(path, texts=(), text=None, vision=None, seed=0, sections=None):
    """Write a tiny random-weight Qwen2.5-VL checkpoint with a tokenizer trained on corpus(texts) and the real
    processor. `text`/`vision`: overrides of the text and vision configs' shapes (toy/miniature.py's larger model); the
    multimodal rotary sections follow the text head size, split 1 : 1.5 : 1.5 as in Qwen2.5-VL's 16/24/24, unless
    `sections` gives the (time, height, width) counts of rotary frequencies (they take the bands in that order,
    highest frequencies first)."""
    import torch  # heavy
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,  # heavy
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    tokenizer, special = make_tokenizer(texts)
    bpe_size = len(tokenizer)

    # ~14 image tokens at most: small images, real patch/merge geometry (14-pixel patches, 2x2 merge).
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_CHAT_TEMPLATE)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2) | (text or {})
    half = text["hidden_size"] // text["num_attention_heads"] // 2  # rotary frequencies per head
    sections = list(sections or [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2])
    if len(sections) != 3 or sum(sections) != half:  # 2, 3, 3 for tiny
        raise ValueError(f"rotary sections {sections} must be three counts adding up to {half}")
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                  fullatt_block_indexes=[1]) | (vision or {})
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=bpe_size, max_position_embeddings=4096, rms_norm_eps=1e-6,
                         tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections},
                         bos_token_id=special[ENDOFTEXT], eos_token_id=special[IM_END],
                         pad_token_id=special[ENDOFTEXT], **text),
        vision_config=dict(out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, **vision),
        image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"], vision_end_token_id=special["<|vision_end|>"],
        bos_token_id=special[ENDOFTEXT], eos_token_id=special[IM_END], pad_token_id=special[ENDOFTEXT])
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [special[IM_END], special[ENDOFTEXT]]
    model.generation_config.pad_token_id = special[ENDOFTEXT]
    model.save_pretrained(path)
    processor.save_pretrained(path)


# Qwen/Qwen2.5-VL-7B-Instruct's published files, value for value except the widths (and the vision depth,
# its full-attention blocks kept at the same place in each group): config.json, generation_config.json,
# preprocessor_config.json, tokenizer_config.json (huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct).
QWEN_ADDED = [  # ids 151643-151664 in this order; the last eight are not special (tokenizer_config.json)
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False)]
QWEN_TEXT = dict(  # config.json: everything but the widths and the layer count
    vocab_size=152064, max_position_embeddings=128000, rope_theta=1e6, rms_norm_eps=1e-6, hidden_act="silu",
    tie_word_embeddings=False, sliding_window=32768, use_sliding_window=False, max_window_layers=28,
    attention_dropout=0.0, initializer_range=0.02, bos_token_id=151643, eos_token_id=151645)
QWEN_MROPE = [16, 24, 24]  # config.json's rope_scaling.mrope_section, for a head of 128 (64 frequencies)
QWEN_VISION = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, tokens_per_second=2,
                   hidden_act="silu", in_channels=3)  # config.json's vision_config, but for its depth and widths
QWEN_IDS = dict(vision_start_token_id=151652, vision_end_token_id=151653, vision_token_id=151654,
                image_token_id=151655, video_token_id=151656, bos_token_id=151643, eos_token_id=151645)
QWEN_GENERATION = dict(bos_token_id=151643, pad_token_id=151643, do_sample=True, eos_token_id=[151645, 151643],
                       repetition_penalty=1.05, temperature=0.1, top_p=0.001, top_k=1)  # generation_config.json
QWEN_PIXELS = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
                   image_mean=[0.48145466, 0.4578275, 0.40821073],  # preprocessor_config.json (CLIP's mean, std)
                   image_std=[0.26862954, 0.26130258, 0.27577711])


def qwen_tokenizer(files):
    """Qwen2.5-VL-7B-Instruct's tokenizer from Qwen2's vocab.json and merges.txt in `files` (a directory), with
    its 22 added tokens at ids 151643-151664 and the settings of its tokenizer_config.json."""
    from tokenizers import AddedToken  # heavy
    from transformers import Qwen2Tokenizer  # heavy
    vocab = json.loads((Path(files) / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in (Path(files) / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    # <|endoftext|> first (the constructor adds its special tokens at once), <|im_end|> the eos once it has its id
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=ENDOFTEXT,
                               pad_token=ENDOFTEXT, errors="replace", model_max_length=131072,
                               clean_up_tokenization_spaces=False, split_special_tokens=False)
    tokenizer.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN_ADDED])
    tokenizer.eos_token = IM_END
    ids = tokenizer.convert_tokens_to_ids([t for t, _ in QWEN_ADDED])
    if ids != list(range(len(vocab), len(vocab) + len(QWEN_ADDED))) or len(vocab) != 151643:
        raise ValueError(f"{files}: expected Qwen2's 151,643 tokens, the added ones from 151643; got {len(vocab)}")
    tokenizer.padding_side, tokenizer.chat_template = "left", QWEN_CHAT_TEMPLATE
    return tokenizer


def build_qwen(path, files, seed=0):
    """tiny-qwen: a random-weight Qwen2.5-VL with Qwen2.5-VL-7B-Instruct's tokenizer, template, processor,
    generation settings and config values, at small widths: text 64 wide (2 heads of 32, so M-RoPE's 16/24/24
    becomes 4/6/6), 2 layers; a 4-block vision tower with window attention and full attention in blocks 1 and 3."""
    import torch  # heavy
    from transformers import (GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,  # heavy
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    tokenizer = qwen_tokenizer(files)
    heads, head_dim, depth = 2, 32, 4
    scale = head_dim // 2 / sum(QWEN_MROPE)  # rotary frequencies per head: 16 here, 64 in the 7B
    text = QWEN_TEXT | dict(hidden_size=heads * head_dim, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=heads, num_key_value_heads=1, pad_token_id=None,
                            rope_parameters={"rope_type": "default", "rope_theta": QWEN_TEXT["rope_theta"],
                                             "mrope_section": [round(s * scale) for s in QWEN_MROPE]})
    full = [1, 3]  # config.json: full attention in blocks 7, 15, 23, 31 of 32, the last of every 8; here of every 2
    vision = QWEN_VISION | dict(depth=depth, hidden_size=32, intermediate_size=64, num_heads=2,
                                out_hidden_size=text["hidden_size"], fullatt_block_indexes=full)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **QWEN_IDS)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(**QWEN_GENERATION)
    model.save_pretrained(path)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**QWEN_PIXELS), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_CHAT_TEMPLATE)
    processor.save_pretrained(path)
