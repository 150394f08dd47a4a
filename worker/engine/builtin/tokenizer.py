"""The built-in byte-level tokenizer: every UTF-8 byte is one token, no merges.

With no merges the tokenizer needs no training corpus, is deterministic, and round-trips any
UTF-8 text. A trained model may later ship a tokenizer with merges; the engine only relies on
the special tokens and the chat template below.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, MASK = "<|pad|>", "<|bos|>", "<|eos|>", "<|mask|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, MASK, "<|user|>", "<|assistant|>", "<|system|>")

# Each turn is "<|role|>\n{content}<|eos|>\n"; the model answers after "<|assistant|>\n" and ends
# its turn with <|eos|>, which is also where the engine stops.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Special tokens take ids 0..6 (in ``SPECIAL_TOKENS`` order), the 256 bytes ids 7..262."""
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_value)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({symbol: len(SPECIAL_TOKENS) + i for i, symbol in enumerate(byte_symbols)})

    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return wrap_tokenizer(backend)


def wrap_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers tokenizer around a byte-level ``backend`` that holds ``SPECIAL_TOKENS``:
    a completion prompt starts with <|bos|>, like the chat template; padding is on the left."""
    bos_id = backend.token_to_id(BOS)
    if bos_id is None:
        raise ValueError(f"the tokenizer has no {BOS} token")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 $B:1", special_tokens=[(BOS, bos_id)]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        mask_token=MASK,
        extra_special_tokens=list(ROLE_TOKENS),
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _byte_value(symbol: str) -> int:
    """Byte value behind a ByteLevel alphabet symbol (GPT-2's printable byte mapping)."""
    code = ord(symbol)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    # Non-printable bytes are shifted to 256 + their rank among non-printable bytes.
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
