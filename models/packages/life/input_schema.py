# The inputs of the "life" example package, in Inferless's format.
INPUT_SCHEMA = {
    "pattern": {  # a named pattern (glider, blinker, r-pentomino) or rows of . and # joined by /
        "datatype": "STRING",
        "required": True,
        "shape": [1],
        "example": ["glider"],
    },
    "steps": {  # generations to run after the initial board
        "datatype": "INT",
        "required": False,
        "shape": [1],
        "example": [16],
    },
    "size": {  # the board is size x size cells and wraps around at its edges
        "datatype": "INT",
        "required": False,
        "shape": [1],
        "example": [10],
    },
}
IS_STREAMING_OUTPUT = True
