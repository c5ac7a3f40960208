"""The tiny Qwen2.5-VL every stage runs on a CPU: random weights, the real transformers classes and processor,
and a small byte-level BPE tokenizer trained on the spot with Qwen's special tokens, split regex and chat template.

`--model tiny` (and `tiny-text`, a text-only Qwen2 teacher) resolve here through data.resolve_model, which builds
the checkpoint once into ~/.cache/x-reasoner and then loads it with from_pretrained like any 7B checkpoint. This
file imports nothing of the project (data.py passes it the text to train the tokenizer on), so it can sit below
every stage; torch, tokenizers and transformers are imported where used ("heavy"), as `import data` stays light.

    python data.py --model tiny      # build (if needed) and print its path
"""
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
