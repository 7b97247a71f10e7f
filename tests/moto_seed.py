"""Seeds moto (STS and IAM) for the metaproxy test bed, then turns auth on.

Creates the instance profile's role and the job roles, assumes the instance
role the way EC2 does (session name = instance id) and prints the resulting
credentials as JSON: the fake IMDS serves them to the daemon. Job roles trust
that exact session ARN, because moto matches trust policies literally.

Usage: python moto_seed.py ENDPOINT ROLE [ROLE ...]
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
    for role in job_roles:
        iam.create_role(
            RoleName=role,
            AssumeRolePolicyDocument=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Principal": {"AWS": instance_arn}, "Action": "sts:AssumeRole"}],
            }),
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
    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                 headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req).read()

    print(json.dumps({
        "AccessKeyId": creds["AccessKeyId"],
        "SecretAccessKey": creds["SecretAccessKey"],
        "Token": creds["SessionToken"],
        "Expiration": creds["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ"),
    }))


if __name__ == "__main__":
    main()
