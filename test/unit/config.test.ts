import { describe, expect, it } from 'vitest';
import { ConfigError, defaultConfig, loadConfig } from '../../src/config.js';
import { moduleRepr, pythonFloatRepr, resolveConfig } from '../../src/nn/config.js';

describe('loadConfig', () => {
  it('takes the defaults with no flags and no environment', () => {
    expect(loadConfig([], {})).toEqual(defaultConfig());
    expect(defaultConfig().port).toBe(50051);
  });

  it('prefers a flag over the environment over the default', () => {
    expect(loadConfig([], { NORMSERVE_PORT: '6000' })!.port).toBe(6000);
    expect(loadConfig(['--port', '7000'], { NORMSERVE_PORT: '6000' })!.port).toBe(7000);
    expect(loadConfig(['--backend=cpu', '--log-level', 'debug'], {})).toMatchObject({ backend: 'cpu', logLevel: 'debug' });
  });

  it('names the setting and its source when a value is bad', () => {
    expect(() => loadConfig(['--port', '70000'], {})).toThrow(/--port=70000/);
    expect(() => loadConfig([], { NORMSERVE_BACKEND: 'cuda' })).toThrow(/NORMSERVE_BACKEND=cuda/);
    expect(() => loadConfig(['--max-tensor-elements', 'lots'], {})).toThrow(ConfigError);
    expect(() => loadConfig(['--nope'], {})).toThrow(/Unknown option '--nope'/);
  });

  it('answers --help with null', () => {
    expect(loadConfig(['--help'], {})).toBeNull();
  });
});

describe('module config', () => {
  const base = { kind: 'BATCH_NORM_2D' as const, numFeatures: 8n, cumulativeAverage: false };

  it("fills in PyTorch's defaults", () => {
    expect(resolveConfig(base)).toEqual({
      kind: 'BATCH_NORM_2D',
      numFeatures: 8,
      eps: 1e-5,
      momentum: 0.1,
      affine: true,
      trackRunningStats: true,
      worldSize: 1,
      syncRule: 'SYNC_WHEN_BATCH_STATS',
    });
    expect(resolveConfig({ ...base, cumulativeAverage: true }).momentum).toBeNull();
  });

  it('refuses what no module can use', () => {
    expect(() => resolveConfig({ ...base, numFeatures: 0n })).toThrow(/num_features must be between 1/);
    expect(() => resolveConfig({ ...base, eps: -1e-5 })).toThrow(/eps must be a finite number >= 0/);
    expect(() => resolveConfig({ ...base, eps: Number.NaN })).toThrow(/eps/);
    expect(() => resolveConfig({ ...base, momentum: Number.POSITIVE_INFINITY })).toThrow(/momentum must be a finite number/);
    expect(() => resolveConfig({ ...base, cumulativeAverage: true, momentum: 0.1 })).toThrow(/momentum must be unset/);
    expect(() => resolveConfig({ ...base, worldSize: 2 })).toThrow(/world_size is for SYNC_BATCH_NORM modules/);
    expect(() => resolveConfig({ ...base, kind: 'SYNC_BATCH_NORM', worldSize: 5000 })).toThrow(/world_size must be between 1 and 4096/);
    expect(resolveConfig({ ...base, kind: 'SYNC_BATCH_NORM', worldSize: 8, syncRule: 'SYNC_WHEN_TRAINING' })).toMatchObject({ worldSize: 8, syncRule: 'SYNC_WHEN_TRAINING' });
  });

  it("accepts any finite momentum and eps 0, as PyTorch does", () => {
    expect(resolveConfig({ ...base, momentum: 1.5, eps: 0 })).toMatchObject({ momentum: 1.5, eps: 0 });
  });
});

describe("Python's float repr", () => {
  it.each([
    [1e-5, '1e-05'],
    [0.1, '0.1'],
    [0, '0.0'],
    [1, '1.0'],
    [0.0001, '0.0001'],
    [1.5e-7, '1.5e-07'],
    [123.25, '123.25'],
    [1e16, '1e+16'],
    [1234567890123456.0, '1234567890123456.0'],
    [-0.3, '-0.3'],
    [0.001, '0.001'],
  ])('repr(%s) == %s', (value, text) => {
    expect(pythonFloatRepr(value)).toBe(text);
  });

  it('makes the module repr PyTorch prints', () => {
    expect(moduleRepr('BATCH_NORM_2D', 64, 1e-5, 0.1, true, true)).toBe(
      'BatchNorm2d(64, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)',
    );
    expect(moduleRepr('SYNC_BATCH_NORM', 3, 0.001, null, false, false)).toBe(
      'SyncBatchNorm(3, eps=0.001, momentum=None, affine=False, track_running_stats=False)',
    );
  });
});
