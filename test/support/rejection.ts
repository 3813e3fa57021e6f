/**
 * The error a call fails with, as the client's NormserveClientError (a raw grpc-js stub's
 * ServiceError is decoded the same way); a call that succeeds fails the test.
 */
import type { ServiceError } from '@grpc/grpc-js';
import { NormserveClientError } from '../../src/client/errors.js';

export async function rejection(p: Promise<unknown>): Promise<NormserveClientError> {
  try {
    await p;
  } catch (err) {
    return err instanceof NormserveClientError ? err : new NormserveClientError(err as ServiceError);
  }
  throw new Error('expected the call to fail');
}
