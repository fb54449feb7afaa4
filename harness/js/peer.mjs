// Element's client engine as a test peer: matrix-js-sdk with its Rust crypto, headless in Node.
//
//   node peer.mjs <homeserver> <user id> <password>
//
// Logs in a fresh device, bootstraps cross-signing, starts syncing with encrypted state events
// enabled, prints {"ready": true, ...} and then answers one JSON command per stdin line with one
// JSON line on stdout: {"id", "cmd", "room", ...}. Commands: join, knock, room, wait_invite,
// wait_name, reload, stop; and, to act as a room admin the way Element does: create, set_name,
// set_topic, send, invite, set_power.
import "fake-indexeddb/auto";
import * as sdk from "matrix-js-sdk";
import { logger } from "matrix-js-sdk/lib/logger.js";
import { createInterface } from "node:readline";

// stdout carries the protocol only: everything the libraries print goes to stderr.
for (const method of ["log", "info", "warn", "debug", "trace"]) console[method] = console.error;

const [baseUrl, userId, password] = process.argv.slice(2);
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const debug = process.env.ENCSTATE_JS_DEBUG === "1";
for (const level of ["trace", "debug", "info", "log"]) {
    logger[level] = debug ? (...args) => console.error(...args) : () => {};
}

const login = await (
    await fetch(`${baseUrl}/_matrix/client/v3/login`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({
            type: "m.login.password",
            identifier: { type: "m.id.user", user: userId },
            password,
        }),
    })
).json();

// The crypto store lives in an in-process IndexedDB, so "reload" can start a second client on
// the same device and store, as Element does when the page reloads.
async function startClient() {
    const c = sdk.createClient({
        baseUrl,
        userId,
        accessToken: login.access_token,
        deviceId: login.device_id,
        enableEncryptedStateEvents: true,
    });
    await c.initRustCrypto({ useIndexedDB: true });
    await c.getCrypto().bootstrapCrossSigning({
        authUploadDeviceSigningKeys: async (makeRequest) => {
            await makeRequest({
                type: "m.login.password",
                identifier: { type: "m.id.user", user: userId },
                password,
            });
        },
    });
    const prepared = new Promise((resolve) => {
        c.on(sdk.ClientEvent.Sync, (state) => {
            if (state === "PREPARED") resolve();
        });
    });
    await c.startClient({ initialSyncLimit: 20 });
    await prepared;
    return c;
}

let client = await startClient();
out({ ready: true, userId, deviceId: login.device_id });

function describe(roomId) {
    const room = client.getRoom(roomId);
    if (!room) return { known: false };
    const nameEvent = room.currentState.getStateEvents("m.room.name", "");
    const encrypted = room.currentState.getStateEvents("m.room.encrypted") ?? [];
    return {
        known: true,
        membership: room.getMyMembership(),
        name: room.name,
        nameState: nameEvent ? nameEvent.getContent().name ?? null : null,
        encryptedState: encrypted.map((e) => ({
            key: e.getStateKey(),
            decrypted: !e.isDecryptionFailure() && e.getClearContent() !== null,
            type: e.getClearContent() !== null ? e.getType() : null,
            content: e.getClearContent(),
        })),
    };
}

// The room's encrypted m.room.name, fetched afresh from the server and decrypted by the crypto
// as a client restart would: matrix-js-sdk decrypts a state event once, when the sync brings it,
// and joinRoom() imports the bundle only after the join request returns, racing the join's sync.
// An event that failed there is never decrypted again (the retry sends the placeholder's state
// key, which the Rust crypto rejects), so the room state can keep ciphertext while the keys sit
// in the store.
async function freshName(roomId) {
    const path = `/rooms/${encodeURIComponent(roomId)}/state`;
    const events = await client.http.authedRequest(sdk.Method.Get, path);
    const raw = events.find(
        (e) => e.type === "m.room.encrypted" && e.state_key === "m.room.name:",
    );
    if (!raw) return { name: null, reason: "no encrypted m.room.name in the room state" };
    const event = new sdk.MatrixEvent({ ...raw, room_id: roomId });
    await client.decryptEventIfNeeded(event);
    if (event.isDecryptionFailure() || event.getType() !== "m.room.name") {
        return { name: null, reason: String(event.decryptionFailureReason ?? event.getType()) };
    }
    return { name: event.getContent().name ?? null, reason: null };
}

// Name watchers: every distinct (name, undecryptable name event) the room state goes through.
const watches = new Map();
function snapshot(roomId) {
    const state = describe(roomId);
    const failed = (state.encryptedState ?? []).some(
        (e) => e.key === "m.room.name:" && !e.decrypted,
    );
    return { name: state.nameState ?? null, undecryptable: failed };
}

async function handle(cmd) {
    switch (cmd.cmd) {
        case "join":
            await client.joinRoom(cmd.room);
            return describe(cmd.room);
        case "knock":
            await client.knockRoom(cmd.room);
            return {};
        case "room":
            return describe(cmd.room);
        case "wait_name": {
            // until the name reads as cmd.name, in the live room state or (see freshName, unless
            // cmd.live) on decrypting the stored event again; says which
            const deadline = Date.now() + (cmd.seconds ?? 30) * 1000;
            for (;;) {
                const state = describe(cmd.room);
                if (state.known && state.nameState === cmd.name) {
                    return { ...state, readableName: state.nameState, readIn: "room state" };
                }
                const fresh =
                    state.known && !cmd.live ? await freshName(cmd.room) : { name: null };
                if (fresh.name === cmd.name || Date.now() > deadline) {
                    return { ...state, readableName: fresh.name, readIn: "fresh decryption", fresh };
                }
                await new Promise((r) => setTimeout(r, 300));
            }
        }
        case "wait_invite": {
            const deadline = Date.now() + (cmd.seconds ?? 30) * 1000;
            for (;;) {
                const state = describe(cmd.room);
                if (state.membership === "invite" || Date.now() > deadline) return state;
                await new Promise((r) => setTimeout(r, 200));
            }
        }
        case "create": {
            // a state-encrypted room (MSC4362), created the way Element's labs flag does
            const initial_state = [
                {
                    type: "m.room.encryption",
                    state_key: "",
                    content: {
                        algorithm: "m.megolm.v1.aes-sha2",
                        "io.element.msc4362.encrypt_state_events": true,
                    },
                },
                {
                    type: "m.room.history_visibility",
                    state_key: "",
                    content: { history_visibility: cmd.history ?? "shared" },
                },
            ];
            if (cmd.joinRule) {
                initial_state.push({ type: "m.room.join_rules", state_key: "", content: cmd.joinRule });
            }
            const { room_id } = await client.createRoom({
                preset: cmd.preset ?? "private_chat",
                invite: cmd.invite ?? [],
                initial_state,
                power_level_content_override: { users: { ...(cmd.power ?? {}) }, users_default: 0 },
            });
            const deadline = Date.now() + 30000;
            while (!client.getRoom(room_id) && Date.now() < deadline) {
                await new Promise((r) => setTimeout(r, 100));
            }
            return { room: room_id };
        }
        case "set_name":
            return await client.setRoomName(cmd.room, cmd.name);
        case "set_topic":
            return await client.setRoomTopic(cmd.room, cmd.topic);
        case "send":
            return await client.sendTextMessage(cmd.room, cmd.body);
        case "invite":
            return await client.invite(cmd.room, cmd.user);
        case "set_power": {
            const path = `/rooms/${encodeURIComponent(cmd.room)}/state/m.room.power_levels/`;
            const levels = await client.http.authedRequest(sdk.Method.Get, path);
            levels.users = { ...(levels.users ?? {}), ...cmd.users };
            return await client.http.authedRequest(sdk.Method.Put, path, undefined, levels);
        }
        case "wait_member": {
            const deadline = Date.now() + (cmd.seconds ?? 30) * 1000;
            for (;;) {
                const member = client.getRoom(cmd.room)?.getMember(cmd.user);
                if (member?.membership === (cmd.membership ?? "join") || Date.now() > deadline) {
                    return { membership: member?.membership ?? null };
                }
                await new Promise((r) => setTimeout(r, 200));
            }
        }
        case "watch": {
            const seen = [snapshot(cmd.room)];
            const timer = setInterval(() => {
                const now = snapshot(cmd.room);
                const last = seen[seen.length - 1];
                if (now.name !== last.name || now.undecryptable !== last.undecryptable) seen.push(now);
            }, 25);
            watches.set(cmd.room, { seen, timer });
            return seen[0];
        }
        case "history":
            return watches.get(cmd.room)?.seen ?? [];
        case "reload":
            client.stopClient();
            client = await startClient();
            return describe(cmd.room);
        case "stop":
            client.stopClient();
            setTimeout(() => process.exit(0), 100);
            return {};
        default:
            throw new Error(`unknown command ${cmd.cmd}`);
    }
}

for await (const line of createInterface({ input: process.stdin })) {
    if (!line.trim()) continue;
    const cmd = JSON.parse(line);
    try {
        out({ id: cmd.id, ok: true, result: await handle(cmd) });
    } catch (e) {
        out({ id: cmd.id, ok: false, error: String(e?.stack ?? e) });
    }
}
