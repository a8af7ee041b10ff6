"""The JetFormer objective, noise curriculum, optimizer and train steps."""

from keras_jetformer.training.callbacks import NonFiniteLossError
from keras_jetformer.training.callbacks import NonFiniteLossGuard
from keras_jetformer.training.objective import add_rgb_noise
from keras_jetformer.training.objective import bits_per_dim
from keras_jetformer.training.objective import draw_training_noise
from keras_jetformer.training.objective import jetformer_objective
from keras_jetformer.training.objective import noise_curriculum
from keras_jetformer.training.optimizer import jetformer_optimizer
from keras_jetformer.training.train_step import ObjectiveTrainer
