/**
 * Golden fixtures written by scripts/make_golden.py from a real PyTorch (format in that script's
 * header). Tensors arrive as base64 little-endian bytes and are decoded here.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

export interface FixtureTensor {
  shape: number[];
  dtype: 'float32' | 'float64';
  b64: string;
}

export interface ModuleStateFixture {
  training: boolean;
  track_running_stats: boolean;
  weight: FixtureTensor | null;
  bias: FixtureTensor | null;
  running_mean: FixtureTensor | null;
  running_var: FixtureTensor | null;
  num_batches_tracked: number | null;
}

export interface FixtureError {
  type: string;
  message: string;
}

export interface Step {
  op: 'update' | 'forward' | 'backward' | 'load_state' | 'reset_running_stats' | 'reset_parameters' | 'get_state';
  save?: boolean;
  grad_output?: FixtureTensor;
  training?: boolean;
  track_running_stats?: boolean;
  clear_buffers?: ('running_mean' | 'running_var' | 'num_batches_tracked')[];
  input?: FixtureTensor;
  state?: Partial<Record<'weight' | 'bias' | 'running_mean' | 'running_var', FixtureTensor>> & { num_batches_tracked?: number };
  version?: number | null;
  strict?: boolean;
  expect: {
    output?: FixtureTensor;
    output_f64?: FixtureTensor;
    after_f64?: ModuleStateFixture;
    error?: FixtureError;
    grad_input?: FixtureTensor;
    grad_weight?: FixtureTensor;
    grad_bias?: FixtureTensor;
    grad_input_f64?: FixtureTensor;
    grad_weight_f64?: FixtureTensor;
    grad_bias_f64?: FixtureTensor;
    missing_keys?: string[];
    unexpected_keys?: string[];
    state_dict?: Record<string, FixtureTensor | number>;
    state_dict_keys?: string[];
  };
  after: ModuleStateFixture;
}

export interface Scenario {
  id: string;
  description: string;
  kind: 'BATCH_NORM_1D' | 'BATCH_NORM_2D' | 'BATCH_NORM_3D' | 'SYNC_BATCH_NORM';
  config: { num_features: number; eps: number; momentum: number | null; affine: boolean; track_running_stats: boolean };
  initial: ModuleStateFixture;
  steps: Step[];
}

export interface FixtureFile {
  group: string;
  torch_version: string;
  scenarios: Scenario[];
}

export const GOLDEN_DIR = join(import.meta.dirname, '..', 'fixtures', 'golden');

export function loadGolden(): FixtureFile[] {
  return readdirSync(GOLDEN_DIR)
    .filter((f) => f.endsWith('.json'))
    .sort()
    .map((f) => JSON.parse(readFileSync(join(GOLDEN_DIR, f), 'utf8')) as FixtureFile);
}

/** The tensor's values as float64 numbers (float32 fixtures widen exactly). */
export function values(t: FixtureTensor): Float64Array {
  const bytes = Buffer.from(t.b64, 'base64');
  const copy = new Uint8Array(bytes.byteLength);
  copy.set(bytes);
  return t.dtype === 'float64' ? new Float64Array(copy.buffer) : Float64Array.from(new Float32Array(copy.buffer));
}

export function float32(t: FixtureTensor): Float32Array {
  return Float32Array.from(values(t));
}
