"""What an image goes through, defined once for training and serving.

  source file --source_image (Pillow; the build, trainer.predict)-->
  stored image --model_input.decode--> uint8 [H, W, C]
               --model_input.read_resize--> uint8 [h, w, C]
               --model_input.normalize--> float32 model input
  (and model_input.denormalize back to pixels for pictures)

source_image.py runs in the Beam build and in trainer.predict; serving.py
is its port to TensorFlow ops for the exported SavedModel, which cannot call
Pillow; model_input.py is used by the reader, evaluation, the sample
pictures and the export alike.
"""
