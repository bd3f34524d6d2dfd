"""kombu's filesystem transport with messages published atomically.

kombu writes a message into its final file name (open, lock, write), and a consumer moves any
file with that name away and reads it without taking the lock. A consumer that polls between
the writer's ``open`` and its ``write`` takes an empty file: the JSON fails to decode, the file
is already gone, and the message is lost (seen in CI as a task queued forever). Here a message
is written under a name no consumer matches and renamed into place, which is atomic: a
consumer sees a whole message or none.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.transport import filesystem
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        # The final name sorts like kombu's own (creation order first), so FIFO order holds.
        final = os.path.join(
            self.data_folder_out,
            f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg",
        )
        partial = os.path.join(self.data_folder_out, f".partial-{uuid.uuid4()}")
        with open(partial, "wb") as f:
            f.write(dumps(payload).encode())
        os.replace(partial, final)


class Transport(filesystem.Transport):
    Channel = Channel
