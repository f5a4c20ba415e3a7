"""A tiny random-weight stand-in for `Salesforce/blip-image-captioning-base`, the captioning model
that Data-Juicer's `image_captioning_mapper` loads (the demo's `demo-captions` variant and the
tests), in the real repository's layout: config.json (architectures BlipForConditionalGeneration,
which Data-Juicer's model loader instantiates by name), preprocessor_config.json
(BlipImageProcessor), the BERT tokenizer files (tokenizer.json, tokenizer_config.json, vocab.txt,
special_tokens_map.json) and model.safetensors; AutoProcessor reloads it as a BlipProcessor.

* A seeded random `BlipForConditionalGeneration` (hidden 32, one layer each, 32 px images): tens
  of thousands of parameters, a caption in milliseconds on CPU. It writes nonsense.
* A hand-made WordPiece vocabulary: BERT's special tokens, BLIP's `[DEC]` (the decoder's
  bos_token_id, as in the real 30,524-token vocabulary) and a few hundred common Chinese
  characters, so that its captions exercise the CJK paths (ChatGLM token counts, the captions page).
* `mute=True` makes its first token always `[SEP]` (the end of the caption): an empty caption,
  what a real captioner returns for some images, from the real generate() path.
"""

from __future__ import annotations

from pathlib import Path

from kolors_story.files import share_as_umask_allows

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DEC = "[DEC]"
# 常用汉字: enough that a random caption is visibly Chinese text
CHARACTERS = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能"
              "下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量"
              "都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各"
              "重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代"
              "想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接"
              "知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理府研质花草树云雨风"
              "雪月星河湖海船桥楼窗门灯衣裙发眼笑坐站走读书画墨色红绿蓝白黑金银少女王子猫狗鸟鱼")
TINY_SIZE = 32  # pixels: the image processor's size and the vision tower's image_size


def tiny_vocab() -> list[str]:
    return [*SPECIAL, *dict.fromkeys(CHARACTERS), DEC]  # each character once, in order


def _tokenizer(folder: Path, vocab: list[str]):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True, tokenize_chinese_chars=True,
                                  model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": DEC})
    return tokenizer


def _config(vocab: list[str]):
    from transformers import BlipConfig

    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 160, "encoder_hidden_size": 32,
            "bos_token_id": vocab.index(DEC), "sep_token_id": vocab.index("[SEP]"),
            "eos_token_id": vocab.index("[SEP]"), "pad_token_id": vocab.index("[PAD]")}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": TINY_SIZE, "patch_size": 8}
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=32, image_text_hidden_size=32)


def build_tiny_blip(out_dir: Path, seed: int = 0, mute: bool = False) -> Path:
    """Write the tiny BLIP captioner to `out_dir` (made or replaced); return it."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    out_dir = Path(out_dir)
    vocab = tiny_vocab()
    tokenizer = _tokenizer(out_dir, vocab)
    config = _config(vocab)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    if mute:  # every caption ends at once: [SEP] always wins
        with torch.no_grad():
            model.text_decoder.cls.predictions.bias[config.text_config.sep_token_id] = 1e4
    image_processor = BlipImageProcessor(size={"height": TINY_SIZE, "width": TINY_SIZE})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    share_as_umask_allows(out_dir)  # save_pretrained's safetensors files are 0600
    (out_dir / "README.md").write_text(
        "Tiny random-weight BLIP in the layout of Salesforce/blip-image-captioning-base "
        f"(kolors_story.models.random_blip, seed {seed}{', mute' if mute else ''}). It captions nonsense.\n",
        encoding="utf-8")
    return out_dir
