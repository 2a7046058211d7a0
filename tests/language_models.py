"""Tiny KerasHub causal LMs saved as local presets, and real text corpora.

A user's downloaded preset, without the download: each architecture is
built from a config with random weights and a real tokenizer of its kind
(byte-level BPE for GPT-2, Llama 3 and Qwen 3, so that any text tokenizes;
SentencePiece trained here on a license text for Gemma and Gemma 3), then
`save_to_preset`. Corpora are cut from text shipped with Debian (licenses,
package changelogs), which no one here wrote.
"""

import gzip
import io
import os

import keras

ARCHITECTURES = ("gpt2", "llama3", "qwen3", "gemma", "gemma3")
SEQUENCE_LENGTH = 24
_SMALL = dict(num_layers=1, hidden_dim=16, intermediate_dim=32)
_GQA = dict(_SMALL, num_query_heads=2, num_key_value_heads=1)
_LICENSES = "/usr/share/common-licenses"


def license_text(name="GPL-3", chars=4000, skip=0):
  """Part of a license text Debian ships."""
  with open(os.path.join(_LICENSES, name), encoding="utf-8") as f:
    return f.read()[skip:skip + chars]


def changelog_text(chars=4000):
  """Part of Debian package changelogs (release notes, names, versions)."""
  text = []
  root = "/usr/share/doc"
  for package in sorted(os.listdir(root)):
    path = os.path.join(root, package, "changelog.Debian.gz")
    if os.path.isfile(path):
      with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        text.append(f.read(chars))
    if sum(map(len, text)) >= chars:
      break
  return "".join(text)[:chars]


def write_corpus(folder, text, name="part.txt"):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
    f.write(text)
  return str(folder)


def save_preset(kind, directory, sequence_length=SEQUENCE_LENGTH,
                trained_on=None, epochs=0):
  """A `kind` CausalLM (one of `ARCHITECTURES`) saved at `directory`;
  first trained `epochs` epochs on the texts `trained_on` if given (a
  model that knows a domain, as a user's downloaded one does)."""
  import keras_hub  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  hub = keras_hub.models
  if kind == "gpt2":
    tokenizer = hub.GPT2Tokenizer(**_byte_vocabulary(["<|endoftext|>"]))
    backbone = hub.GPT2Backbone(tokenizer.vocabulary_size(), num_heads=2,
                                max_sequence_length=64, **_SMALL)
    lm = hub.GPT2CausalLM(backbone, hub.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length))
  elif kind == "llama3":
    tokenizer = hub.Llama3Tokenizer(**_byte_vocabulary(
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
         "<|end_header_id|>", "<|eot_id|>"]))
    backbone = hub.Llama3Backbone(tokenizer.vocabulary_size(),
                                  tie_word_embeddings=False, **_GQA)
    lm = hub.Llama3CausalLM(backbone, hub.Llama3CausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length))
  elif kind == "qwen3":
    tokenizer = hub.Qwen3Tokenizer(**_byte_vocabulary(
        ["<|endoftext|>", "<|im_end|>"]))
    backbone = hub.Qwen3Backbone(tokenizer.vocabulary_size(), head_dim=8,
                                 **_GQA)
    lm = hub.Qwen3CausalLM(backbone, hub.Qwen3CausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length))
  elif kind == "gemma":
    tokenizer = hub.GemmaTokenizer(proto=_sentencepiece())
    backbone = hub.GemmaBackbone(tokenizer.vocabulary_size(), head_dim=8,
                                 **_GQA)
    lm = hub.GemmaCausalLM(backbone, hub.GemmaCausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length))
  elif kind == "gemma3":
    tokenizer = hub.Gemma3Tokenizer(proto=_sentencepiece(),
                                    has_vision_tokens=False)
    backbone = hub.Gemma3Backbone(tokenizer.vocabulary_size(), image_size=16,
                                  head_dim=8, vision_encoder=None, **_GQA)
    lm = hub.Gemma3CausalLM(backbone=backbone,
                            preprocessor=hub.Gemma3CausalLMPreprocessor(
                                tokenizer, sequence_length=sequence_length))
  else:
    raise ValueError(kind)
  if trained_on is not None:
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), sampler="greedy")
    lm.fit(trained_on, batch_size=8, epochs=epochs, verbose=0)
  lm.save_to_preset(str(directory))
  return str(directory)


def _byte_vocabulary(special):
  """Every byte as a token (as GPT-2's byte-level BPE maps them), a few
  merges, and the special tokens: any text tokenizes."""
  from keras_hub.src.tokenizers import byte_pair_tokenizer  # pylint: disable=g-import-not-at-top
  _, characters = byte_pair_tokenizer.bytes_to_unicode()
  vocabulary = {token: i for i, token in enumerate(special)}
  for c in characters:
    vocabulary.setdefault(c, len(vocabulary))
  merges = ["Ġ t", "t h", "e r", "Ġ a"]
  for merge in merges:
    vocabulary.setdefault(merge.replace(" ", ""), len(vocabulary))
  return dict(vocabulary=vocabulary, merges=merges)


def _sentencepiece():
  """A small SentencePiece model trained on a license text, with Gemma's
  special pieces and byte fallback."""
  import sentencepiece  # pylint: disable=g-import-not-at-top
  model = io.BytesIO()
  lines = [line for line in license_text(chars=40000).splitlines()
           if line.strip()]
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=400,
      model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, bos_id=2,
      unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
      unk_piece="<unk>", user_defined_symbols=["<start_of_turn>",
                                               "<end_of_turn>"],
      minloglevel=2)
  return model.getvalue()
