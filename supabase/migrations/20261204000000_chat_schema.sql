-- The tables the worker relies on, in the Supabase CLI's migration layout.
-- On a Supabase project `profiles.id` is also the id of the auth user; the
-- foreign key to auth.users is left to the platform's own migrations so this
-- schema applies to any Postgres (development, tests, CI).

create extension if not exists pgcrypto;

create table if not exists public.profiles (
    id uuid primary key default gen_random_uuid(),
    display_name text not null,
    kind text not null default 'human' check (kind in ('human', 'assistant')),
    created_at timestamptz not null default now()
);

create table if not exists public.conversations (
    id uuid primary key default gen_random_uuid(),
    title text not null default '',
    kind text not null default 'direct' check (kind in ('direct', 'group', 'assistant')),
    created_by uuid references public.profiles (id),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create table if not exists public.conversation_members (
    conversation_id uuid not null references public.conversations (id) on delete cascade,
    profile_id uuid not null references public.profiles (id) on delete cascade,
    role text not null default 'member',
    joined_at timestamptz not null default now(),
    primary key (conversation_id, profile_id)
);
create index if not exists conversation_members_profile_idx
    on public.conversation_members (profile_id);

create table if not exists public.jobs (
    id uuid primary key,
    job_type text not null,
    status text not null default 'queued'
        check (status in ('queued', 'processing', 'completed', 'failed', 'cancelled')),
    input jsonb not null default '{}'::jsonb,
    output jsonb,
    error_message text,
    error_kind text,
    attempts integer not null default 0,
    created_by uuid references public.profiles (id) on delete set null,
    created_at timestamptz not null default now(),
    started_at timestamptz,
    finished_at timestamptz,
    updated_at timestamptz not null default now()
);
create index if not exists jobs_status_idx on public.jobs (status, updated_at);

-- A reply is keyed by the job that produced it: `job_id` is unique, so however
-- often a chat job runs it can own at most one message.
create table if not exists public.messages (
    id uuid primary key default gen_random_uuid(),
    conversation_id uuid not null references public.conversations (id) on delete cascade,
    sender_id uuid not null references public.profiles (id),
    content text not null default '',
    message_type text not null default 'text' check (message_type in ('text', 'ai', 'system')),
    reply_to_id uuid references public.messages (id) on delete set null,
    job_id uuid unique references public.jobs (id) on delete set null,
    status text not null default 'completed'
        check (status in ('generating', 'completed', 'stopped', 'failed', 'interrupted')),
    -- The run of the job that owns a reply being generated: when a job is taken
    -- over, the newest run owns it and writes from an older run are ignored.
    run_id uuid,
    metadata jsonb not null default '{}'::jsonb,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index if not exists messages_conversation_created_idx
    on public.messages (conversation_id, created_at desc);
create index if not exists messages_generating_idx
    on public.messages (updated_at) where status = 'generating';

create table if not exists public.notifications (
    id uuid primary key default gen_random_uuid(),
    user_id uuid not null references public.profiles (id) on delete cascade,
    notification_type text not null,
    data jsonb not null default '{}'::jsonb,
    job_id uuid references public.jobs (id) on delete set null,
    read_at timestamptz,
    created_at timestamptz not null default now(),
    unique (job_id, user_id)
);
create index if not exists notifications_user_created_idx
    on public.notifications (user_id, created_at desc);

-- The assistant's own profile: every AI reply is sent from it. Its id is fixed
-- so the worker and the API agree on it without a lookup.
insert into public.profiles (id, display_name, kind)
values ('00000000-0000-4000-8000-00000000a1a1', 'Uvian Assistant', 'assistant')
on conflict (id) do nothing;
