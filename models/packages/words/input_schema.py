# The inputs of the "words" example package, in Inferless's format.
INPUT_SCHEMA = {
    "prompt": {
        "datatype": "STRING",
        "required": True,
        "shape": [1],
        "example": ["Rivulet streams every word of this sentence as its own event"],
    },
    "delay_ms": {  # pause between two words; 0 streams as fast as the client reads
        "datatype": "INT",
        "required": False,
        "shape": [1],
        "example": [50],
    },
}
IS_STREAMING_OUTPUT = True
