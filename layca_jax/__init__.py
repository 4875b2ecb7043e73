"""layca-jax: measure and control layer rotation in JAX/Optax.

Layer rotation (Carbonnelle & De Vleeschouwer, 2019) is the cosine distance
between each layer's weights and their initialisation; Layca sets each
layer's rotation rate directly.

Layout: :mod:`layca_jax._layers` (which leaves are layers, their units and
order), :mod:`layca_jax._numerics` (safe float32 reductions),
:mod:`layca_jax._closed_form` (every update in closed form per unit: fast
sums, careful fallback, free units), :mod:`layca_jax._layca` (the ``layca``
and ``keep_norm`` links), :mod:`layca_jax._optimizers` and
:mod:`layca_jax._fused` (the paper's optimizers),
:mod:`layca_jax._rotation` (measurement),
:mod:`layca_jax._equilibrium` (rates from weight-decayed recipes),
:mod:`layca_jax._tracking` (in-graph tracking and readers),
:mod:`layca_jax._order` (forward order, flat metrics),
:mod:`layca_jax._history` (host recorder), :mod:`layca_jax._replay` (rate
schedules replaying recorded step angles), :mod:`layca_jax._plot` (curves
and table).
"""

from layca_jax._equilibrium import equilibrium_angle
from layca_jax._equilibrium import equilibrium_rate
from layca_jax._history import RotationHistory
from layca_jax._layca import free_units
from layca_jax._layca import KeepNormState
from layca_jax._layca import keep_norm
from layca_jax._layca import layca
from layca_jax._layca import LaycaState
from layca_jax._layca import norm_drift
from layca_jax._layca import skipped_steps
from layca_jax._layers import alpha_multipliers
from layca_jax._layers import layer_specs
from layca_jax._layers import LayerSpec
from layca_jax._optimizers import layca_adagrad
from layca_jax._optimizers import layca_adam
from layca_jax._optimizers import layca_rmsprop
from layca_jax._optimizers import layca_sgd
from layca_jax._order import flatten_rotations
from layca_jax._order import forward_order
from layca_jax._order import NeuronSpread
from layca_jax._plot import plot_layer_rotation_curves
from layca_jax._plot import rotation_table
from layca_jax._replay import replay_multipliers
from layca_jax._rotation import copy_params
from layca_jax._rotation import layer_rotation
from layca_jax._rotation import step_rotation
from layca_jax._tracking import rotation_history
from layca_jax._tracking import step_angle_history
from layca_jax._tracking import track_rotation
from layca_jax._tracking import tracked_rotation
from layca_jax._tracking import tracked_step_angle
from layca_jax._tracking import TrackRotationState

__version__ = '0.1.0'

__all__ = (
    'KeepNormState',
    'LaycaState',
    'LayerSpec',
    'NeuronSpread',
    'RotationHistory',
    'TrackRotationState',
    'alpha_multipliers',
    'copy_params',
    'equilibrium_angle',
    'equilibrium_rate',
    'flatten_rotations',
    'forward_order',
    'free_units',
    'keep_norm',
    'layca',
    'layca_adagrad',
    'layca_adam',
    'layca_rmsprop',
    'layca_sgd',
    'layer_rotation',
    'layer_specs',
    'norm_drift',
    'plot_layer_rotation_curves',
    'replay_multipliers',
    'rotation_history',
    'rotation_table',
    'skipped_steps',
    'step_angle_history',
    'step_rotation',
    'track_rotation',
    'tracked_rotation',
    'tracked_step_angle',
)
