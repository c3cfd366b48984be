"""The error type for user mistakes: shown as one line, never a traceback.

Defined here, at the bottom of the toolkit, so that the dataset format
stands alone (tfrecords_schema imports nothing of pipelines or trainer);
`pipelines.common.errors.UserError` is this class. Every command's entry
point catches UserError (and only it, for user mistakes) and prints
`error: <message>`. Errors that libraries raise for a user's input subclass
it: tfrecords_schema.DatasetError (a folder that is no built dataset, or a
damaged one), trainer.models.ModelError (a model that cannot be built for
this dataset).
"""


class UserError(ValueError):
  """Bad input or flags. The message names the value received and the fix."""
