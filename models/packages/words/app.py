"""Example package: streams the words of its input, one event per word, with a short pause between them.

No torch and nothing to load: the smallest complete streaming package. Each event is
``{"index": 0, "word": "Rivulet"}``; the stream ends with ``finalise_streamed_output()``.
"""
import time

DEFAULT_DELAY_MS = 50
MAX_DELAY_MS = 2000  # keeps one request from holding the engine for long between two words


class InferlessPythonModel:
    def initialize(self):
        """Nothing to load; a real package loads its weights here, once, before the service is ready."""

    def infer(self, inputs, stream_output_handler):
        delay_ms = inputs.get("delay_ms", DEFAULT_DELAY_MS)
        if not 0 <= delay_ms <= MAX_DELAY_MS:
            raise ValueError(f"delay_ms must be between 0 and {MAX_DELAY_MS}")
        for index, word in enumerate(inputs["prompt"].split()):
            if index and delay_ms:
                time.sleep(delay_ms / 1000)
            stream_output_handler.send_streamed_output({"index": index, "word": word})
        stream_output_handler.finalise_streamed_output()

    def finalize(self):
        """Nothing to release."""
