"""A process-wide memo of deterministic loading: token sequences, chat-template renders, transformed images.

Off by default. ``memoize(True)`` turns it on for a process that encodes the same small set of texts and
images many times, with models loaded afresh each time (``regap-fast reproduce``: every task trains on the
same records and asks the same held-out requests under several conditions). A result comes back only for the
same input, the same encoder settings and a tokenizer of the same content (its serialised backend, length,
chat template and special tokens), so two models loaded from copies of one tokenizer share it; an image,
for the same file (path, size, modification time in ns) and the same transform. Tokenizers must not be
changed in place while it is on (their content is read once per object), nor image files rewritten with
the same size and modification time.
"""

from __future__ import annotations

import hashlib
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Hashable, Optional

_memo: Optional[dict] = None
_max_entries = 0
_tokenizer_content: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def memoize(on: bool = True, max_entries: int = 500_000) -> None:
    """Turn the memo on (emptied) or off for this process; past ``max_entries`` results it starts again."""
    global _memo, _max_entries
    _memo, _max_entries = ({} if on else None), max_entries


def enabled() -> bool:
    return _memo is not None


@contextmanager
def memoizing():
    """The memo on within the block (as it was before, after it)."""
    before = enabled()
    if not before:
        memoize(True)
    try:
        yield
    finally:
        if not before:
            memoize(False)


def tokenizer_key(tokenizer) -> Optional[Hashable]:
    """What a tokenizer's results depend on, or None (no memo) for one without a serialisable backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = _tokenizer_content.get(tokenizer)
    if digest is None:
        digest = hashlib.sha256(backend.to_str().encode()).hexdigest()
        _tokenizer_content[tokenizer] = digest
    return (digest, len(tokenizer), getattr(tokenizer, "chat_template", None), tuple(tokenizer.all_special_ids),
            tuple(tokenizer.all_special_tokens))


def cached(key: Optional[Hashable], compute: Callable[[], Any]) -> Any:
    """``compute()``, or its earlier result for ``key`` (None: no memo). Exceptions are not kept."""
    if _memo is None or key is None:
        return compute()
    try:
        return _memo[key]
    except KeyError:
        pass
    value = compute()
    if len(_memo) >= _max_entries:
        _memo.clear()
    _memo[key] = value
    return value


def file_key(path: Path) -> Optional[Hashable]:
    """A file's identity for the memo (None if it cannot be read: the caller's own error follows)."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
