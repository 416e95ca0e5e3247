"""Example package: Conway's Game of Life as a small torch model, one event per generation.

One generation is one convolution (count the eight neighbours) and an elementwise rule, run on the
device Rivulet chose for this worker: ``initialize(context)`` receives it as ``context.device`` (called
without a context, as on Inferless, the package picks CUDA when present). Each event is
``{"step": 3, "alive": 5, "board": ".#..\\n..#.\\n..."}``: generation 0 is the starting board.
"""
import torch
import torch.nn.functional as F
from torch import nn

PATTERNS = {
    "glider": ".#./..#/###",
    "blinker": "###",
    "r-pentomino": ".##/##./.#.",
}
DEFAULT_STEPS, MAX_STEPS = 16, 1000
DEFAULT_SIZE, MIN_SIZE, MAX_SIZE = 10, 3, 64


class LifeStep(nn.Module):
    """One generation of a board that wraps around at its edges."""

    def __init__(self) -> None:
        super().__init__()
        kernel = torch.ones(1, 1, 3, 3)
        kernel[0, 0, 1, 1] = 0  # a cell is not its own neighbour
        self.register_buffer("kernel", kernel)  # [out=1, in=1, 3, 3]

    def forward(self, board: torch.Tensor) -> torch.Tensor:  # board: [1, 1, H, W], 0.0 or 1.0
        neighbours = F.conv2d(F.pad(board, (1, 1, 1, 1), mode="circular"), self.kernel)  # [1, 1, H, W]
        born = neighbours == 3
        survives = (board == 1) & (neighbours == 2)
        return (born | survives).to(board.dtype)


def parse_pattern(pattern: str, size: int) -> list[list[int]]:
    """A named pattern or rows of '.'/'#' joined by '/', placed in the middle of a size x size board."""
    rows = PATTERNS.get(pattern, pattern).split("/")
    if not rows or any(set(row) - {".", "#"} for row in rows):
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)} or rows of . and # joined by /")
    height, width = len(rows), max(len(row) for row in rows)
    if height > size or width > size:
        raise ValueError(f"the pattern ({height}x{width}) does not fit a {size}x{size} board")
    top, left = (size - height) // 2, (size - width) // 2
    board = [[0] * size for _ in range(size)]
    for y, row in enumerate(rows):
        for x, cell in enumerate(row):
            board[top + y][left + x] = int(cell == "#")
    return board


def render(board: torch.Tensor) -> str:
    return "\n".join("".join("#" if cell else "." for cell in row) for row in board[0, 0].int().tolist())


class InferlessPythonModel:
    def initialize(self, context=None):
        if context is not None:
            self.device = context.device
        else:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.step = LifeStep().to(self.device)

    def infer(self, inputs, stream_output_handler):
        steps = inputs.get("steps", DEFAULT_STEPS)
        size = inputs.get("size", DEFAULT_SIZE)
        if not 0 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be between 0 and {MAX_STEPS}")
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise ValueError(f"size must be between {MIN_SIZE} and {MAX_SIZE}")
        cells = parse_pattern(inputs["pattern"], size)
        with torch.inference_mode():
            board = torch.tensor(cells, dtype=torch.float32, device=self.device)[None, None]  # [1, 1, H, W]
            for step in range(steps + 1):
                if step:
                    board = self.step(board)
                stream_output_handler.send_streamed_output(
                    {"step": step, "alive": int(board.sum().item()), "board": render(board)})
        stream_output_handler.finalise_streamed_output()

    def finalize(self, context=None):
        self.step = None
