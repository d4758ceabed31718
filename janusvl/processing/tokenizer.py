"""The checkpoint's fast BPE tokenizer, read with `tokenizers` alone.

Behaves like transformers' LlamaTokenizerFast on the same files: `encode` puts exactly one BOS in
front (and an EOS behind if `add_eos_token`), whatever post-processor tokenizer.json carries;
`decode` skips special tokens on request and applies `clean_up_tokenization_spaces` from
tokenizer_config.json (False when absent, LlamaTokenizerFast's default).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from tokenizers import Tokenizer

from ..errors import ConfigError, InputError
from ..validation import check_encodable, integer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

TokenIds = Union[Sequence[int], torch.Tensor]


def read_json_object(file: Path) -> dict[str, Any]:
    """The object in `file`, {} when the file does not exist."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: must hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """Special tokens are written either as a string or as a serialised AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization`, applied when the config asks for it."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _as_id_list(ids: TokenIds | int) -> list[int]:
    if isinstance(ids, int):
        return [ids]
    if hasattr(ids, "ndim"):  # torch tensor or numpy array
        if ids.ndim > 1:
            raise InputError(f"decode takes one sequence of ids, got an array of shape {list(ids.shape)}")
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise InputError(f"decode takes a sequence of token ids, got {type(ids).__name__}")
    ids = list(ids)
    if any(isinstance(i, (list, tuple)) for i in ids):
        raise InputError("decode takes one sequence of ids; use batch_decode for several")
    # The tokenizer stores ids as 32-bit unsigned: anything else would overflow inside it.
    return [integer(f"ids[{n}]", i, 0, 2**32 - 1) for n, i in enumerate(ids)]


class JanusTokenizer:
    """Byte-level BPE tokenizer of a Janus checkpoint, with transformers' encode/decode conventions."""

    def __init__(
        self,
        backend: Tokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        extra_special_tokens: Iterable[str] = (),
    ) -> None:
        self._backend = backend
        # The processor must see whole prompts: never truncate or pad behind the caller's back.
        self._backend.no_truncation()
        self._backend.no_padding()
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.add_bos_token = add_bos_token and self.bos_token_id is not None
        self.add_eos_token = add_eos_token and self.eos_token_id is not None
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        # Skipped by decode(skip_special_tokens=True): the tokens tokenizer.json flags as special,
        # plus every token the config files name as special (transformers treats both alike).
        named = [bos_token, eos_token, pad_token, unk_token, *extra_special_tokens]
        self._special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self._special_ids |= {i for i in map(self.token_to_id, filter(None, named)) if i is not None}
        # The same model without the added tokens: it spells "<|Assistant|>" as ordinary text.
        # (`Tokenizer(model)` shares the BPE tables; it copies nothing large.)
        self._plain = Tokenizer(backend.model)
        self._plain.normalizer, self._plain.pre_tokenizer = backend.normalizer, backend.pre_tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path) -> JanusTokenizer:
        """Load tokenizer.json, tokenizer_config.json and special_tokens_map.json from a directory."""
        path = Path(path)
        file = path / TOKENIZER_FILE
        if not file.is_file():
            raise ConfigError(f"{file}: no {TOKENIZER_FILE}; is {path} a Janus checkpoint directory?")
        try:
            backend = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise ConfigError(f"{file}: cannot load tokenizer: {exc}") from None
        config = read_json_object(path / TOKENIZER_CONFIG)
        # special_tokens_map.json overrides tokenizer_config.json, as in transformers.
        specials = {**config, **read_json_object(path / SPECIAL_TOKENS_MAP)}
        extra = specials.get("additional_special_tokens") or []
        return cls(
            backend,
            bos_token=_token_text(specials.get("bos_token")),
            eos_token=_token_text(specials.get("eos_token")),
            pad_token=_token_text(specials.get("pad_token")),
            unk_token=_token_text(specials.get("unk_token")),
            add_bos_token=bool(config.get("add_bos_token", True)),
            add_eos_token=bool(config.get("add_eos_token", False)),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            extra_special_tokens=[t for t in map(_token_text, extra) if t],
        )

    # --- vocabulary -------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        """Id of `token`, None when it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id_of(self.unk_token)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self._special_ids)

    @property
    def added_tokens(self) -> list[str]:
        """Every string the tokenizer maps to one id wherever it appears, before BPE runs: BOS,
        EOS, pad, the image tags, Janus-Pro's role tokens (special or not, they all act as
        control tokens when they are found in text)."""
        return [t.content for t in self._backend.get_added_tokens_decoder().values()]

    @property
    def vocab(self) -> dict[str, int]:
        return self.get_vocab()

    def get_vocab(self) -> dict[str, int]:
        """Token -> id for the whole vocabulary, added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Unknown tokens map to the unk id (None when the tokenizer has no unk token)."""
        if isinstance(tokens, str):
            found = self.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(
        self, ids: int | TokenIds, skip_special_tokens: bool = False
    ) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [
            self._backend.id_to_token(i)
            for i in _as_id_list(ids)
            if not (skip_special_tokens and i in self._special_ids)
        ]

    # --- encode / decode --------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, exactly one BOS first (per the config)."""
        if not isinstance(text, str):
            raise InputError(f"encode takes a str, got {type(text).__name__}")
        check_encodable("the text to encode", text)  # the tokenizer would raise a bare TypeError
        # Encode bare and add BOS/EOS ourselves, so a BOS post-processor in tokenizer.json
        # (present in some releases, absent in others) can neither double nor drop it.
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return self.with_bos_eos(ids) if add_special_tokens else ids

    def with_bos_eos(self, ids: list[int]) -> list[int]:
        """`ids` with the BOS (and EOS) that `encode` puts around a text, per the config."""
        if self.add_bos_token:
            ids = [self.bos_token_id, *ids]
        if self.add_eos_token:
            ids = [*ids, self.eos_token_id]
        return ids

    def encode_plain(self, text: str) -> list[int]:
        """Ids of `text` as ordinary text: added-token strings in it are spelled by BPE like any
        other text instead of becoming their control token. No BOS."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True) -> dict[str, Any]:
        """{"input_ids", "attention_mask"} as lists (a list of lists for a list of texts)."""
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        batch = [self.encode(t, add_special_tokens) for t in text]
        return {"input_ids": batch, "attention_mask": [[1] * len(ids) for ids in batch]}

    def decode(self, ids: int | TokenIds, skip_special_tokens: bool = False) -> str:
        """Text of one sequence of ids (list, tuple or 1-D tensor)."""
        ids = _as_id_list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_tokenization_spaces else text

    def batch_decode(
        self, sequences: Iterable[TokenIds] | torch.Tensor, skip_special_tokens: bool = False
    ) -> list[str]:
        if isinstance(sequences, torch.Tensor) and sequences.dim() != 2:
            raise InputError(f"batch_decode takes [batch, seq] ids, got shape {list(sequences.shape)}")
        return [self.decode(seq, skip_special_tokens) for seq in sequences]
