"""The token ids behind the answers this server gave, so a client that sends them back as history replays them
exactly.

An OpenAI client re-sends the whole conversation as text each turn. Re-tokenizing an answer does not always give
the ids the model generated (a different but equivalent split, stray byte tokens), and then the KV prefix the
runtime keeps for that conversation stops matching at the first differing id: the rest of the history is
evaluated again. Looking the answer text up here gives the runtime the generated ids, so the prefix matches to the
end of the answer. A text not found (edited, or from another server) is tokenized as usual.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from llava_cli.runtime import Answer


class AnswerMemory:
    """Answer text → generated token ids, least recently used dropped beyond ``capacity``. Thread-safe."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, answer: Answer) -> None:
        if not answer.text or not answer.tokens or answer.finish_reason == "cancelled":
            return
        with self._lock:
            self._ids[answer.text] = list(answer.tokens)
            self._ids.move_to_end(answer.text)
            while len(self._ids) > self.capacity:
                self._ids.popitem(last=False)

    def tokens(self, text: str) -> list[int] | None:
        with self._lock:
            ids = self._ids.get(text)
            if ids is not None:
                self._ids.move_to_end(text)
            return list(ids) if ids is not None else None
