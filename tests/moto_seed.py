"""Seeds moto (STS and IAM) for the metaproxy test bed, then turns auth on.

Creates the instance profile's role and the job roles, assumes the instance
role the way EC2 does (session name = instance id) and prints the resulting
credentials as JSON: the fake IMDS serves them to the daemon. Job roles trust
that exact session ARN, because moto matches trust policies literally.

With --oidc ISSUER it also registers the GitLab instance ISSUER as an IAM
OIDC provider and lets the job roles be assumed with its ID tokens, by the
trust policy statement the README shows (moto does not check tokens or
these conditions: the daemon's verification is what the tests put on
trial). moto cannot serve an unsigned request (AssumeRoleWithWebIdentity)
with auth on, so --oidc also leaves auth off.

It also makes ci-untrusting, a role whose trust policy names another
principal, for `metaproxy doctor` to find.

Usage: python moto_seed.py ENDPOINT [--oidc ISSUER] ROLE [ROLE ...]
"""
import json
import sys
import urllib.request

import boto3

ACCOUNT = "123456789012"
INSTANCE_ROLE = "metaproxy-instance-role"
INSTANCE_SESSION = "i-0123456789abcdef0"


def main():
    endpoint, job_roles = sys.argv[1], sys.argv[2:]
    oidc = None
    if job_roles[:1] == ["--oidc"]:
        oidc, job_roles = job_roles[1], job_roles[2:]
    session = boto3.Session(aws_access_key_id="seed", aws_secret_access_key="seed", region_name="us-east-1")
    iam = session.client("iam", endpoint_url=endpoint)
    sts = session.client("sts", endpoint_url=endpoint)

    allow_all = json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["sts:AssumeRole", "sts:GetCallerIdentity"], "Resource": "*"}],
    })
    iam.create_role(
        RoleName=INSTANCE_ROLE,
        AssumeRolePolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
        }),
    )
    iam.put_role_policy(RoleName=INSTANCE_ROLE, PolicyName="assume-job-roles", PolicyDocument=allow_all)
    instance_arn = f"arn:aws:sts::{ACCOUNT}:assumed-role/{INSTANCE_ROLE}/{INSTANCE_SESSION}"
    trust = [{"Effect": "Allow", "Principal": {"AWS": instance_arn}, "Action": "sts:AssumeRole"}]
    if oidc:
        host = oidc.split("://", 1)[1]
        provider = iam.create_open_id_connect_provider(
            Url=oidc, ClientIDList=["sts.amazonaws.com"], ThumbprintList=["0" * 40],
        )["OpenIDConnectProviderArn"]
        trust.append({
            "Effect": "Allow",
            "Principal": {"Federated": provider},
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": {
                "StringEquals": {f"{host}:aud": "sts.amazonaws.com"},
                "StringLike": {f"{host}:sub": "project_path:group/app:ref_type:branch:ref:main"},
            },
        })
    iam.create_role(
        RoleName="ci-untrusting",
        AssumeRolePolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:role/someone-else"}, "Action": "sts:AssumeRole"}],
        }),
    )
    for role in job_roles:
        iam.create_role(
            RoleName=role,
            AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": trust}),
        )
        iam.put_role_policy(RoleName=role, PolicyName="whoami", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "sts:GetCallerIdentity", "Resource": "*"}],
        }))

    creds = sts.assume_role(
        RoleArn=f"arn:aws:iam::{ACCOUNT}:role/{INSTANCE_ROLE}",
        RoleSessionName=INSTANCE_SESSION,
        DurationSeconds=3600,
    )["Credentials"]

    # From here on moto checks signatures and policies.
    if oidc:
        req = None
    else:
        req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                 headers={"Content-Type": "text/plain"})
    if req:
        urllib.request.urlopen(req).read()

    print(json.dumps({
        "AccessKeyId": creds["AccessKeyId"],
        "SecretAccessKey": creds["SecretAccessKey"],
        "Token": creds["SessionToken"],
        "Expiration": creds["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ"),
    }))


if __name__ == "__main__":
    main()
