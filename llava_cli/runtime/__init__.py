"""The runtime: the text model and its context (llamacpp.py), image encoding and the shared embedding cache
(encoder.py), prompts as tokens and image slots (prompt.py), the sequence scheduler (scheduler.py), and its two
drivers: `Engine` (one caller, synchronous: run, chat, sequential caption) and `Runtime` (many requests at once, a
scheduler thread: serve, caption --parallel). `open_model` resolves ``--model`` and loads either."""

from llava_cli.runtime.conversation import Conversation
from llava_cli.runtime.engine import Engine
from llava_cli.runtime.llamacpp import VocabOnly
from llava_cli.runtime.loader import open_model
from llava_cli.runtime.messages import Answer, EngineStats, Message, Timings
from llava_cli.runtime.runtime import Job, Runtime

__all__ = [
    "Answer",
    "Conversation",
    "Engine",
    "EngineStats",
    "Job",
    "Message",
    "Runtime",
    "Timings",
    "VocabOnly",
    "open_model",
]
