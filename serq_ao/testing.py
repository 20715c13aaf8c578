"""Small real components for tests and benchmarks (as ``torchao.testing``): nothing here is
used by the library itself."""

from __future__ import annotations

BYTE_VOCAB = 256


def make_byte_tokenizer(bos: bool = True):
    """Byte-level BPE with no merges: one token per byte, plus "<s>" (id 256) when ``bos``.

    Its post-processor adds BOS, as Llama tokenizers do, so that tests can check that the
    protocol's tokenization really asks for no special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    assert len(vocab) == BYTE_VOCAB
    if bos:
        vocab["<s>"] = BYTE_VOCAB
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BYTE_VOCAB)])
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")
    return PreTrainedTokenizerFast(tokenizer_object=backend)
