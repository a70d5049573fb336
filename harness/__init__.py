"""
What the scripts need around selfe.py, the method: the data (shapes.py, the shapes world and
ShapesEval; data.py, your images), the text encoder (text_encoder.py), runs saved and loaded
(checkpoints.py), images drawn at any step count (draw.py), the training's clock, memory, MFU and
signals (control.py) and the command-line contract (cli.py). None of it imports a script.
"""
